"""What `agentcg replay` reports: per call, per session and for the whole run."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from agentcg.controller.enforce import Applied


@dataclass(frozen=True)
class CallResult:
    session_id: str
    call: str
    record_id: str
    tool: str
    outcome: str               # ok | oom_killed | policy_killed | failed | not_run
    duration_s: float | None
    recorded_duration_s: float  # compressed
    peak_bytes: int | None
    message: str | None = None
    alloc_s: tuple[float, ...] = ()     # per 8 MiB chunk: map and fault-in time


@dataclass(frozen=True)
class SessionResult:
    session_id: str
    priority: str
    survived: bool
    completion_s: float | None
    nominal_s: float            # recorded duration / speed
    calls: int
    calls_ok: int
    oom_killed: int
    policy_killed: int
    not_run: int
    peak_bytes: int
    alloc_p95_s: float | None = None   # P95 of its calls' chunk allocation latency (None: nothing allocated)


@dataclass
class ReplayResult:
    policy: str
    budget_bytes: int | None
    speed: float
    layout: str
    sessions: list[SessionResult]
    calls: list[CallResult]
    host_peak_bytes: int
    host_mean_bytes: float
    actions: dict[str, int]
    applied: list[Applied]
    degraded: list[str]
    wall_s: float
    timed_out: bool = False

    @property
    def oom_kills(self) -> int:
        return sum(s.oom_killed for s in self.sessions)

    @property
    def calls_killed(self) -> int:
        return sum(s.oom_killed + s.policy_killed for s in self.sessions)

    def to_dict(self) -> dict[str, Any]:
        return {
            "policy": self.policy, "budget_bytes": self.budget_bytes, "speed": self.speed, "layout": self.layout,
            "sessions": [asdict(s) for s in self.sessions],
            "killed_calls": [asdict(c) for c in self.calls if c.outcome in ("oom_killed", "policy_killed")],
            "host_peak_bytes": self.host_peak_bytes, "host_mean_bytes": self.host_mean_bytes,
            "oom_kills": self.oom_kills, "calls_killed": self.calls_killed, "actions": self.actions,
            "action_log": [{"t_s": round(a.time_s, 4), "kind": a.action.kind, "sandbox": a.action.sandbox,
                            "call": a.action.call_id, "ok": a.ok, "reason": a.action.reason, "detail": a.detail,
                            "latency_s": a.latency_s} for a in self.applied],
            "degraded": self.degraded, "wall_s": self.wall_s, "timed_out": self.timed_out,
        }
