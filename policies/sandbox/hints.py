"""Intent hints and the message a killed tool call leaves for its agent.

A tool call may declare its memory need (`agentcg run --mem-hint`). The peaks observed
for earlier calls of the same tool in the same sandbox refine it: with no declaration
they are the estimate; with one, history that saw more than declared wins, and history
that saw less pulls the estimate halfway down (a declaration is a claim, a peak a fact).
"""
from __future__ import annotations

from typing import Sequence

from agentcg.units import format_bytes


def estimate_need(hint_bytes: int | None, observed_peaks: Sequence[int]) -> int | None:
    if not observed_peaks:
        return hint_bytes
    observed = max(observed_peaks)
    if hint_bytes is None or observed >= hint_bytes:
        return observed
    return (hint_bytes + observed) // 2


def describe_need(hint_bytes: int | None, observed_peaks: Sequence[int]) -> str:
    parts = []
    if hint_bytes is not None:
        parts.append(f"declared {format_bytes(hint_bytes)}")
    if observed_peaks:
        parts.append(f"{len(observed_peaks)} earlier call(s) peaked at up to {format_bytes(max(observed_peaks))}")
    return ", ".join(parts) or "no declared or observed need"


def kill_message(*, call_id: str, tool: str, sandbox: str, reason: str, limit_name: str,
                 limit_bytes: int, usage_bytes: int, call_usage_bytes: int, call_peak_bytes: int) -> str:
    """What the agent reads on stderr of `agentcg run` and in the call's record."""
    return (
        f"agentcg killed tool call {call_id} ({tool}) in sandbox {sandbox}: {reason}. "
        f"Limit applied: {limit_name} of {format_bytes(limit_bytes)}, of which "
        f"{format_bytes(usage_bytes)} ({usage_bytes / limit_bytes:.0%}) was in use; this call held "
        f"{format_bytes(call_usage_bytes)} (peak {format_bytes(call_peak_bytes)}). Its output is "
        "incomplete. Retry with a smaller working set (fewer tests or workers at once), or pass "
        "--mem-hint so that agentcg waits for room before starting it."
    )
