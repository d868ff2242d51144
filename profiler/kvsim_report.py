"""Run several KV policies on the same sessions and engine, and print the comparison."""
from __future__ import annotations

import json
from dataclasses import asdict

from agentcg.errors import InvalidInput
from agentcg.policies.kv import POLICY_NAMES
from agentcg.profiler.kvsim import GB, PolicyResult, SimConfig, simulate
from agentcg.profiler.kvsim_cost import EngineModel
from agentcg.profiler.kvsim_sessions import SimSession
from agentcg.units import format_bytes

DEFAULT_GPU_KV_FRACTION = 0.5
DEFAULT_HOST_MEMORY_BYTES = 256 << 30    # 2 TiB per 8-GPU H200 node / 8
DEFAULT_SSD_BYTES = 2 << 40

ORACLES = ("infercept: the remaining tool-call time (the trace's duration), as its released code; "
           "continuum and agentcg: is_last_step (the client marks a session's last call)")


def build_config(sessions: list[SimSession], model: EngineModel, *, gpu_kv_bytes: int | None = None,
                 gpu_kv_fraction: float = DEFAULT_GPU_KV_FRACTION,
                 host_memory_bytes: int = DEFAULT_HOST_MEMORY_BYTES, ssd_bytes: int = DEFAULT_SSD_BYTES,
                 arrival_interval_s: float = 0.0) -> SimConfig:
    """GPU KV capacity: `gpu_kv_bytes`, else `gpu_kv_fraction` of the sum over sessions of
    their mean context (what all sessions would hold at once). Policies that do not share
    host memory with the sandboxes get a fixed host KV pool: the budget minus every
    sandbox's peak (the reservation that is safe without coordination)."""
    if not 0 < gpu_kv_fraction <= 10:
        raise InvalidInput(f"--gpu-kv-fraction must be in (0, 10], got {gpu_kv_fraction}")
    if gpu_kv_bytes is None:
        gpu_kv_bytes = int(gpu_kv_fraction * sum(s.mean_context_tokens for s in sessions) * model.bytes_per_token)
    static = max(0, host_memory_bytes - sum(s.peak_sandbox_bytes for s in sessions))
    return SimConfig(model, gpu_kv_bytes, host_memory_bytes, static, ssd_bytes, arrival_interval_s=arrival_interval_s)


def parse_policies(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in POLICY_NAMES]
    if unknown or not names:
        raise InvalidInput(f"unknown KV policy {', '.join(unknown) or '(none)'}; choose from {', '.join(POLICY_NAMES)}")
    return list(dict.fromkeys(names))


def compare(sessions: list[SimSession], policies: list[str], config: SimConfig) -> list[PolicyResult]:
    return [simulate(sessions, name, config) for name in policies]


def _gib(nbytes: float) -> str:
    return f"{nbytes / 2**30:,.0f}"


def format_table(results: list[PolicyResult]) -> str:
    head = ("policy", "JCT p50 s", "JCT p95 s", "KV waste GB·s", "recomputed tok",
            "GPU>host GiB", "host>GPU GiB", "host>SSD GiB", "SSD>GPU GiB", "peak host KV GiB",
            "preempt", "err/fallback/refused")
    rows = [head]
    for r in results:
        m = r.bytes_moved
        rows.append((r.policy, f"{r.jct_quantile(0.5):,.0f}", f"{r.jct_quantile(0.95):,.0f}",
                     f"{r.gpu_kv_waste_gbs:,.0f}", f"{r.recomputed_tokens:,}",
                     _gib(m.get("gpu_to_host", 0)), _gib(m.get("host_to_gpu", 0)),
                     _gib(m.get("host_to_ssd", 0)), _gib(m.get("ssd_to_gpu", 0)),
                     _gib(r.peak_host_kv_bytes), f"{r.preemptions:,}",
                     f"{r.policy_errors}/{r.fallbacks}/{r.refused_directives + r.unknown_directives}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = ["  ".join(cell.rjust(w) if i else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths)))
             for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def format_header(sessions: list[SimSession], config: SimConfig, source: str, imputed: int,
                  skipped: list[tuple[str, str]]) -> str:
    model = config.model
    turns = sum(len(s.turns) for s in sessions)
    lines = [
        f"sessions: {len(sessions)} ({turns:,} LLM calls) from {source}"
        + (f"; skipped {len(skipped)}: " + ", ".join(f"{n} ({why})" for n, why in skipped) if skipped else ""),
        f"engine: {model.source}",
        f"GPU KV: {format_bytes(config.gpu_kv_bytes)} ({config.gpu_kv_bytes // model.bytes_per_token:,} tokens "
        f"of {format_bytes(model.bytes_per_token)}); host budget {format_bytes(config.host_memory_bytes)} "
        f"(fixed host KV pool of non-sharing policies {format_bytes(config.host_kv_static_bytes)}); "
        f"SSD {format_bytes(config.ssd_bytes)}; links GPU>host {model.d2h_bytes_per_s / GB:.1f} GB/s, "
        f"host>GPU {model.h2d_bytes_per_s / GB:.1f} GB/s",
        f"oracles: {ORACLES}",
    ]
    if imputed:
        lines.append(f"tool calls without a duration: {imputed} (given their tool's median)")
    return "\n".join(lines)


def results_json(results: list[PolicyResult]) -> str:
    out = []
    for r in results:
        data = asdict(r)
        data.pop("jct_s")
        data["jct_p50_s"], data["jct_p95_s"] = r.jct_quantile(0.5), r.jct_quantile(0.95)
        out.append(data)
    return json.dumps(out, indent=2)
