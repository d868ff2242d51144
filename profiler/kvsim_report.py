"""Run several KV policies on the same sessions and engine, and print the comparison.

A policy spec is a name (`agentcg.policies.kv.POLICY_NAMES`) or `name:POOL` for a policy
with a fixed host pool, POOL being `safe` (the host budget minus the sum of the sandboxes'
peaks: never OOM-kills a sandbox) or `optimistic` (the budget minus the sum of their mean
memory: what a dashboard suggests). A plain name gets the config's pool.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import asdict

from agentcg.errors import InvalidInput
from agentcg.policies.kv import POLICY_NAMES
from agentcg.profiler.kvsim import GB, PolicyResult, SimConfig, simulate
from agentcg.profiler.kvsim_cost import EngineModel
from agentcg.profiler.kvsim_sessions import SimSession, estimate_shared_prefix_tokens
from agentcg.units import format_bytes

DEFAULT_GPU_KV_FRACTION = 0.5
DEFAULT_HOST_MEMORY_BYTES = 256 << 30    # 2 TiB per 8-GPU H200 node / 8
DEFAULT_SSD_BYTES = 2 << 40
POOLS = ("safe", "optimistic")

ORACLES = ("infercept: the remaining tool-call time (the trace's duration), as its released code; "
           "continuum: is_last_step (the client marks a session's last call); agentcg: none used")


def pool_bytes(sessions: list[SimSession], host_memory_bytes: int, pool: str, reserve_bytes: int = 0) -> int:
    """A fixed host KV pool sized by an operator: `safe` = budget - sum of sandbox peaks,
    `optimistic` = budget - sum of sandbox means (time-weighted)."""
    if pool not in POOLS:
        raise InvalidInput(f"host pool must be one of {', '.join(POOLS)}, got {pool!r}")
    use = sum(s.peak_sandbox_bytes if pool == "safe" else s.mean_sandbox_bytes for s in sessions)
    return max(0, host_memory_bytes - reserve_bytes - use)


def kv_demand_tokens(sessions: list[SimSession], shared_prefix_tokens: int) -> float:
    """What all sessions would hold at once: their mean contexts, the shared prefix once."""
    own = sum(max(0.0, s.mean_context_tokens - shared_prefix_tokens) for s in sessions)
    return own + shared_prefix_tokens


def build_config(sessions: list[SimSession], model: EngineModel, *, gpu_kv_bytes: int | None = None,
                 gpu_kv_fraction: float = DEFAULT_GPU_KV_FRACTION,
                 host_memory_bytes: int = DEFAULT_HOST_MEMORY_BYTES, ssd_bytes: int = DEFAULT_SSD_BYTES,
                 arrival_interval_s: float = 0.0, host_pool: str = "safe",
                 shared_prefix_tokens: int | None = None, sandbox_memory: bool = True) -> SimConfig:
    """GPU KV capacity: `gpu_kv_bytes`, else `gpu_kv_fraction` of what all sessions would
    hold at once (`kv_demand_tokens`). `shared_prefix_tokens` None: estimated from the
    sessions (`estimate_shared_prefix_tokens`). Policies with a fixed host pool get
    `pool_bytes(host_pool)`; agentcg's pool follows the sandboxes."""
    if not 0 < gpu_kv_fraction <= 10:
        raise InvalidInput(f"--gpu-kv-fraction must be in (0, 10], got {gpu_kv_fraction}")
    prefix = estimate_shared_prefix_tokens(sessions) if shared_prefix_tokens is None else shared_prefix_tokens
    if prefix < 0:
        raise InvalidInput(f"--shared-prefix must be >= 0 tokens, got {prefix}")
    if gpu_kv_bytes is None:
        gpu_kv_bytes = int(gpu_kv_fraction * kv_demand_tokens(sessions, prefix) * model.bytes_per_token)
    pool = pool_bytes(sessions, host_memory_bytes, host_pool)
    return SimConfig(model, gpu_kv_bytes, host_memory_bytes, pool, ssd_bytes, arrival_interval_s=arrival_interval_s,
                     shared_prefix_tokens=prefix, sandbox_memory=sandbox_memory, host_pool=host_pool)


def parse_policies(text: str) -> list[str]:
    specs = [n.strip() for n in text.split(",") if n.strip()]
    bad = []
    for spec in specs:
        name, _, pool = spec.partition(":")
        if name not in POLICY_NAMES or (pool and pool not in POOLS):
            bad.append(spec)
    if bad or not specs:
        raise InvalidInput(f"unknown KV policy {', '.join(bad) or '(none)'}; choose from {', '.join(POLICY_NAMES)} "
                           f"(a name may end in :safe or :optimistic, its host pool)")
    return list(dict.fromkeys(specs))


def config_for(spec: str, sessions: list[SimSession], config: SimConfig) -> tuple[str, SimConfig]:
    name, _, pool = spec.partition(":")
    if pool and pool != config.host_pool:
        config = dataclasses.replace(config, host_pool=pool,
                                     host_kv_static_bytes=pool_bytes(sessions, config.host_memory_bytes, pool,
                                                                     config.host_reserve_bytes))
    return name, config


def run_one(sessions: list[SimSession], spec: str, config: SimConfig) -> PolicyResult:
    name, cfg = config_for(spec, sessions, config)
    return simulate(sessions, name, cfg)


_WORK: tuple | None = None      # (sessions, [(spec, config)]) inherited by forked workers


def _work(i: int) -> PolicyResult:
    sessions, jobs = _WORK
    return run_one(sessions, *jobs[i])


def run_many(sessions: list[SimSession], jobs: list[tuple[str, SimConfig]], workers: int = 1) -> list[PolicyResult]:
    """Each (spec, config) on the same sessions, in order; in `workers` forked processes."""
    global _WORK
    workers = max(1, min(workers, len(jobs)))
    if workers == 1 or not hasattr(os, "fork"):
        return [run_one(sessions, spec, cfg) for spec, cfg in jobs]
    import multiprocessing

    _WORK = (sessions, jobs)
    try:
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            return pool.map(_work, range(len(jobs)), chunksize=1)
    finally:
        _WORK = None


def compare(sessions: list[SimSession], policies: list[str], config: SimConfig, workers: int = 1) -> list[PolicyResult]:
    return run_many(sessions, [(spec, config) for spec in policies], workers)


def default_workers() -> int:
    return max(1, min(4, os.cpu_count() or 1))


def _gib(nbytes: float) -> str:
    return f"{nbytes / 2**30:,.0f}"


def format_table(results: list[PolicyResult]) -> str:
    head = ("policy", "JCT p50 s", "JCT p95 s", "TTFT resumed p50/p95 s", "recomputed tok",
            "GPU>host GiB", "host>GPU GiB", "host>SSD GiB", "SSD>GPU GiB", "host pool GiB", "peak host KV GiB",
            "host idle GiB", "OOM kills", "forced spill GiB", "preempt", "err/fallback/unpinned/refused")
    rows = [head]
    for r in results:
        m = r.bytes_moved
        rows.append((r.label or r.policy, f"{r.jct_quantile(0.5):,.0f}", f"{r.jct_quantile(0.95):,.0f}",
                     f"{r.ttft_quantile(0.5):,.2f}/{r.ttft_quantile(0.95):,.2f}", f"{r.recomputed_tokens:,}",
                     _gib(m.get("gpu_to_host", 0)), _gib(m.get("host_to_gpu", 0)),
                     _gib(m.get("host_to_ssd", 0)), _gib(m.get("ssd_to_gpu", 0)),
                     "shared" if r.policy == "agentcg" else _gib(r.host_pool_bytes),
                     _gib(r.peak_host_kv_bytes), f"{r.host_idle_mean_bytes / 2**30:,.1f}",
                     f"{r.sandbox_oom_kills:,}" + (f" ({r.failed_calls} failed)" if r.failed_calls else ""),
                     _gib(r.forced_spill_bytes), f"{r.preemptions:,}",
                     f"{r.policy_errors}/{r.fallbacks}/{r.pins_released}/{r.refused_directives + r.unknown_directives}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = ["  ".join(cell.rjust(w) if i else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths)))
             for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def format_header(sessions: list[SimSession], config: SimConfig, source: str, imputed: int,
                  skipped: list[tuple[str, str]]) -> str:
    model = config.model
    turns = sum(len(s.turns) for s in sessions)
    peaks = sum(s.peak_sandbox_bytes for s in sessions)
    means = sum(s.mean_sandbox_bytes for s in sessions)
    lines = [
        f"sessions: {len(sessions)} ({turns:,} LLM calls) from {source}"
        + (f"; skipped {len(skipped)}: " + ", ".join(f"{n} ({why})" for n, why in skipped) if skipped else ""),
        f"engine: {model.source}",
        f"GPU KV: {format_bytes(config.gpu_kv_bytes)} ({config.gpu_kv_bytes // model.bytes_per_token:,} tokens "
        f"of {format_bytes(model.bytes_per_token)}); shared prefix {config.shared_prefix_tokens:,} tokens "
        f"(stored once per tier); SSD {format_bytes(config.ssd_bytes)}; links GPU>host "
        f"{model.d2h_bytes_per_s / GB:.1f} GB/s, host>GPU {model.h2d_bytes_per_s / GB:.1f} GB/s",
        f"host budget {format_bytes(config.host_memory_bytes)}; sandboxes: sum of peaks {format_bytes(peaks)}, "
        f"sum of means {format_bytes(means)}; fixed host pool {config.host_pool} "
        f"{format_bytes(config.host_kv_static_bytes)} (vllm-v1-offload, continuum*, infercept; vllm-v1 has none); "
        f"agentcg's pool follows the sandboxes",
        f"arrivals every {config.arrival_interval_s:g} s; oracles: {ORACLES}",
    ]
    if imputed:
        lines.append(f"tool calls without a duration: {imputed} (given their tool's median)")
    return "\n".join(lines)


def results_json(results: list[PolicyResult]) -> str:
    out = []
    for r in results:
        data = asdict(r)
        data.pop("jct_s")
        data.pop("ttft_resumed_s")
        data["jct_p50_s"], data["jct_p95_s"] = r.jct_quantile(0.5), r.jct_quantile(0.95)
        data["ttft_resumed_p50_s"], data["ttft_resumed_p95_s"] = r.ttft_quantile(0.5), r.ttft_quantile(0.95)
        data["host_idle_mean_bytes"] = r.host_idle_mean_bytes
        out.append({k: (None if isinstance(v, float) and v != v else v) for k, v in data.items()})
    return json.dumps(out, indent=2)
