"""Byte thresholds the kernel is asked to report, from the policy's fractions of a budget.

A sandbox with a budget gets one memcg threshold per distinct fraction (throttle_at,
freeze_at, kill_at): the kernel wakes the daemon as its usage crosses each, in either
direction. A tool call gets one eBPF RSS threshold: the room left before the next
fraction its sandbox (or the host) has not yet reached, given what the rest of the
sandbox holds now; it is re-armed after every step, so it follows the others' usage.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from agentcg.policies.sandbox import GraduatedConfig

MIN_CALL_THRESHOLD_BYTES = 4 << 20     # below this an RSS threshold fires on start-up noise
DRIFT_BYTES = 256 << 10                 # the rest of a scope may grow this much between two steps
REARM_SLACK = 1 / 32                    # a new threshold this close to the armed one is not written


@dataclass(frozen=True)
class Thresholds:
    fractions: tuple[float, ...]

    @classmethod
    def of(cls, config: GraduatedConfig) -> "Thresholds":
        return cls(tuple(sorted({config.throttle_at, config.freeze_at, config.kill_at})))


def sandbox_thresholds(budget_bytes: int | None, t: Thresholds) -> tuple[int, ...]:
    if not budget_bytes:
        return ()
    return tuple(math.ceil(budget_bytes * f) for f in t.fractions)


def call_threshold_bytes(budget_bytes: int | None, scope_bytes: int, call_bytes: int, t: Thresholds) -> int | None:
    """RSS of the call at which its scope (`scope_bytes` in use, `call_bytes` of them the
    call's) reaches the next fraction of `budget_bytes`; None when there is no budget or
    the scope is past the last fraction already (the tick and PSI cover that)."""
    if not budget_bytes:
        return None
    others = max(0, scope_bytes - call_bytes)
    for fraction in t.fractions:
        # the crossing must mean "at the fraction" to the policy, which compares usage / budget
        room = math.ceil(budget_bytes * fraction) - others + DRIFT_BYTES
        if room > call_bytes:
            return max(MIN_CALL_THRESHOLD_BYTES, room)
    return None


def needs_rearm(armed: int | None, wanted: int | None) -> bool:
    if armed is None or wanted is None:
        return armed != wanted
    return abs(armed - wanted) > armed * REARM_SLACK
