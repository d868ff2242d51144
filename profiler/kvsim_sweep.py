"""`agentcg kv sweep`: the KV policies over a grid, not one point.

Axes: GPU KV fraction (of what all sessions would hold at once) x session arrival spacing x
host budget. At each point every baseline runs with a safe fixed host pool (the pool an
operator can run without OOM-killing a sandbox) and agentcg with its pool following the
sandboxes; the figure is agentcg's ratio to the best baseline: best baseline JCT p50 /
agentcg JCT p50 (above 1: agentcg is faster). A table and a PNG heat map (one panel per
host budget) come out. A sweep on a subset of the sessions (`stride`) scales the host
budgets by the subset's share of the sessions, so each point has the same pressure.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from agentcg.errors import InvalidInput
from agentcg.profiler.kvsim import PolicyResult
from agentcg.profiler.kvsim_cost import EngineModel
from agentcg.profiler.kvsim_report import build_config, run_many
from agentcg.profiler.kvsim_sessions import SimSession

BASELINES = ("vllm-v1", "vllm-v1-priority", "vllm-v1-offload:safe", "infercept:safe", "continuum:safe",
             "continuum-paper:safe")
OURS = "agentcg"
FRACTIONS = (0.25, 0.5, 1.0)
SPACINGS_S = (0.0, 30.0)
BUDGETS = (256 << 30, 48 << 30)


@dataclass(frozen=True)
class SweepPoint:
    gpu_kv_fraction: float
    arrival_interval_s: float
    host_memory_bytes: int          # for the whole session set (the run's budget is scaled)
    results: tuple[PolicyResult, ...]

    def p50(self, spec: str) -> float:
        for r in self.results:
            if r.label == spec or r.policy == spec:
                return r.jct_quantile(0.5)
        return math.nan

    @property
    def best_baseline(self) -> tuple[str, float]:
        rest = [r for r in self.results if r.policy != OURS]
        best = min(rest, key=lambda r: r.jct_quantile(0.5))
        return best.label or best.policy, best.jct_quantile(0.5)

    @property
    def ratio(self) -> float:
        _, best = self.best_baseline
        ours = self.p50(OURS)
        return best / ours if ours > 0 else math.nan


def sweep(sessions: list[SimSession], model: EngineModel, *, fractions=FRACTIONS, spacings_s=SPACINGS_S,
          budgets=BUDGETS, baselines=BASELINES, stride: int = 1, ssd_bytes: int = 0,
          workers: int = 1, total_sessions: int | None = None) -> list[SweepPoint]:
    """Every point of the grid; `stride` > 1 runs every stride-th session."""
    if stride < 1:
        raise InvalidInput(f"--stride must be at least 1, got {stride}")
    subset = sessions[::stride]
    share = len(subset) / (total_sessions or len(sessions))
    peaks = sum(s.peak_sandbox_bytes for s in subset)
    jobs, keys, shared = [], [], {}
    for budget in budgets:
        for frac in fractions:
            for spacing in spacings_s:
                cfg = build_config(subset, model, gpu_kv_fraction=frac, host_memory_bytes=int(budget * share),
                                   ssd_bytes=ssd_bytes, arrival_interval_s=spacing)
                for spec in (*baselines, OURS):
                    # A policy without a host pool does not see the budget while the sandboxes
                    # fit in it whole (nothing to OOM-kill): one run serves every budget.
                    if not host_tier(spec) and budget * share >= peaks:
                        if (spec, frac, spacing) in shared:
                            continue
                        shared[(spec, frac, spacing)] = len(jobs)
                    jobs.append((spec, cfg))
                    keys.append((frac, spacing, budget))
    results = run_many(subset, jobs, workers)
    points: dict[tuple, list[PolicyResult]] = {}
    for key, r in zip(keys, results):
        points.setdefault(key, []).append(r)
    for (spec, frac, spacing), index in shared.items():
        for budget in budgets:
            if (frac, spacing, budget) != keys[index] and budget * share >= peaks:
                points[(frac, spacing, budget)].insert(0, results[index])
    return [SweepPoint(f, s, b, tuple(rs)) for (f, s, b), rs in sorted(points.items(), key=_order(budgets))]


def _order(budgets):
    return lambda item: (budgets.index(item[0][2]), item[0][0], item[0][1])


def host_tier(spec: str) -> bool:
    """False for a policy that never uses a host pool (vllm-v1, vllm-v1-priority)."""
    return spec.partition(":")[0] not in ("vllm-v1", "vllm-v1-priority")


def format_sweep(points: list[SweepPoint]) -> str:
    head = ("host budget", "GPU KV frac", "spacing s", "agentcg p50 s", "best baseline", "its p50 s", "ratio")
    rows = [head]
    for p in points:
        name, best = p.best_baseline
        rows.append((f"{p.host_memory_bytes / 2**30:,.0f} GiB", f"{p.gpu_kv_fraction:g}", f"{p.arrival_interval_s:g}",
                     f"{p.p50(OURS):,.0f}", name, f"{best:,.0f}", f"{p.ratio:.2f}x"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    ratios = [p.ratio for p in points if math.isfinite(p.ratio)]
    if ratios:
        lines.append(f"agentcg / best baseline (JCT p50): min {min(ratios):.2f}x, max {max(ratios):.2f}x over "
                     f"{len(ratios)} points")
    return "\n".join(lines)


def plot_sweep(points: list[SweepPoint], path: str | Path) -> Path:
    """A heat map per host budget: GPU KV fraction (rows) x arrival spacing (columns)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import TwoSlopeNorm

    path = Path(path)
    budgets = sorted({p.host_memory_bytes for p in points}, reverse=True)
    fractions = sorted({p.gpu_kv_fraction for p in points})
    spacings = sorted({p.arrival_interval_s for p in points})
    ratios = [p.ratio for p in points if math.isfinite(p.ratio)] or [1.0]
    norm = TwoSlopeNorm(vcenter=1.0, vmin=min(min(ratios), 0.9), vmax=max(max(ratios), 1.1))
    fig, axes = plt.subplots(1, len(budgets), figsize=(4.4 * len(budgets) + 1.0, 3.8), squeeze=False)
    image = None
    for ax, budget in zip(axes[0], budgets):
        grid = [[math.nan] * len(spacings) for _ in fractions]
        for p in points:
            if p.host_memory_bytes == budget:
                grid[fractions.index(p.gpu_kv_fraction)][spacings.index(p.arrival_interval_s)] = p.ratio
        image = ax.imshow(grid, cmap="RdYlGn", norm=norm, origin="lower", aspect="auto")
        for i, row in enumerate(grid):
            for j, value in enumerate(row):
                ax.text(j, i, f"{value:.2f}x", ha="center", va="center", fontsize=9)
        ax.set_xticks(range(len(spacings)), [f"{s:g}" for s in spacings])
        ax.set_yticks(range(len(fractions)), [f"{f:g}" for f in fractions])
        ax.set_xlabel("session arrival spacing (s)")
        if ax is axes[0][0]:
            ax.set_ylabel("GPU KV fraction of demand")
        ax.set_title(f"host budget {budget / 2**30:,.0f} GiB")
    fig.suptitle("agentcg JCT p50 speed-up over the best baseline (safe host pools)", y=1.04)
    fig.colorbar(image, ax=list(axes[0]), shrink=0.8, label="best baseline p50 / agentcg p50")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path
