"""`agentcg kv simulate --real`: the same sessions and policies on the reference engine
(`agentcg.gpu.engine`, docs/engine.md) instead of the cost model.

The engine really computes (a random-weight decoder with a small KV geometry) and really
moves KV between its device, host and SSD tiers, so sessions are scaled down: every
context is scaled so the longest is `max_context_tokens`, outputs are capped at
`max_output_tokens`, tool gaps are multiplied by `time_scale`. Device KV holds
`gpu_kv_fraction` of the scaled sessions' contexts (at least the longest one), the host
tier four times that. Meant for a GPU host; on a CPU it runs, slowly, for a few sessions.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

from agentcg.errors import InvalidInput
from agentcg.profiler.kvsim_sessions import SimSession, SimTurn

GEOMETRY = (4, 2, 32, "fp32", 16)     # layers, kv heads, head dim, dtype, tokens per block


@dataclass(frozen=True)
class RealResult:
    policy: str
    device_kind: str
    jct_p50_s: float
    jct_p95_s: float
    recomputed_tokens: int
    to_host_bytes: int
    from_host_bytes: int
    preemptions: int
    errors: str
    wall_s: float


def scale_sessions(sessions: list[SimSession], max_context_tokens: int, max_output_tokens: int) -> list[SimSession]:
    longest = max(t.input_tokens for s in sessions for t in s.turns)
    factor = min(1.0, max_context_tokens / longest)
    return [SimSession(s.session_id, s.sandbox, tuple(
        SimTurn(max(1, round(t.input_tokens * factor)), max(1, min(t.output_tokens, max_output_tokens)),
                t.tool, t.tool_s, t.sandbox_bytes) for t in s.turns)) for s in sessions]


def _engine_context(session: SimSession) -> int:
    """The longest context the engine builds: each call appends at least one token (the
    tool's result) and its output."""
    ctx = 0
    for t in session.turns:
        ctx += max(1, t.input_tokens - ctx) + t.output_tokens
    return ctx


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    pos = q * (len(ordered) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def run_real(sessions: list[SimSession], policies: list[str], run_sessions: Callable[..., Any],
             make_geometry: Callable[..., Any], *, gpu_kv_fraction: float = 0.5,
             max_context_tokens: int = 512, max_output_tokens: int = 8, time_scale: float = 0.01,
             timeout_s: float = 600.0) -> list[RealResult]:
    """`run_sessions` and `make_geometry` are the reference engine's entry point and its
    KVGeometry (agentcg.gpu.engine.run_sessions, agentcg.gpu.kvgeometry.KVGeometry): the
    caller passes them, so the profiler does not import the GPU part."""
    scaled = scale_sessions(sessions, max_context_tokens, max_output_tokens)
    geometry = make_geometry(*GEOMETRY)
    block = GEOMETRY[4]
    mean_total = sum(s.mean_context_tokens for s in scaled)
    longest = max(_engine_context(s) for s in scaled)
    # At least twice the longest context: the engine must fit one request while another holds KV.
    device_blocks = max(math.ceil(gpu_kv_fraction * mean_total / block), 2 * math.ceil(longest / block) + 2)
    out = []
    for name in policies:
        try:
            r = run_sessions(scaled, geometry, name, device_blocks=device_blocks, host_blocks=4 * device_blocks,
                             max_new_tokens=max_output_tokens, time_scale=time_scale, max_batched_tokens=512,
                             max_running=64, timeout_s=timeout_s)
        except (RuntimeError, TimeoutError) as exc:
            raise InvalidInput(f"--real: the reference engine stopped under {name}: {exc} "
                               f"({device_blocks} device blocks; raise --gpu-kv-fraction or lower "
                               f"--real-max-context)") from None
        jct = [s.jct_s for s in r.sessions]
        out.append(RealResult(name, r.device_kind, _quantile(jct, 0.5), _quantile(jct, 0.95), r.recomputed_tokens,
                              r.bytes_moved("device", "host"), r.bytes_moved("host", "device"), r.preemptions,
                              f"{r.policy_errors}/{r.fallbacks}/{r.refused_directives}", r.wall_s))
    return out


def format_real(results: list[RealResult]) -> str:
    head = ("policy", "device", "JCT p50 s", "JCT p95 s", "recomputed tok", "device>host B", "host>device B",
            "preempt", "err/fallback/refused", "wall s")
    rows = [head] + [(r.policy, r.device_kind, f"{r.jct_p50_s:.2f}", f"{r.jct_p95_s:.2f}", f"{r.recomputed_tokens:,}",
                      f"{r.to_host_bytes:,}", f"{r.from_host_bytes:,}", str(r.preemptions), r.errors,
                      f"{r.wall_s:.1f}") for r in results]
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    return "\n".join("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths)))
                     for row in rows)
