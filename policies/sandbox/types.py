"""What a sandbox policy sees (a `Snapshot`) and what it answers (`Action`s).

The controller (the daemon, or `agentcg replay`) reads the cgroups, builds a snapshot and
calls `policy.decide(snapshot, state)`; the policy answers actions and its next state.
Nothing here does I/O. Sizes are bytes, times seconds (the snapshot's own clock).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, TypeVar

from agentcg.errors import InvalidInput

PRIORITIES = ("low", "normal", "high")
PRIORITY_RANK = {name: rank for rank, name in enumerate(PRIORITIES)}
# The one priority -> cpu.weight table (cgroup v2 weights, 1..10000, default 100); the
# cgroup layer maps it to v1 cpu.shares. Sandboxes, tool calls and `protect` all use it.
PRIORITY_CPU_WEIGHT = {"low": 25, "normal": 100, "high": 400}

THROTTLE = "throttle"   # value_bytes -> memory.high of the call (cpu_max_cores where v1 has no memory.high)
FREEZE = "freeze"
THAW = "thaw"
RELAX = "relax"         # memory.high (and the cpu.max fallback) back to unlimited
KILL = "kill"           # a tool call only, never a sandbox's agent; `message` is for the agent
PROTECT = "protect"     # value_bytes -> memory.low of the sandbox, cpu_weight -> cpu.weight
LIMIT = "limit"         # value_bytes -> memory.max of the sandbox (the `static` container cap)
ADMIT = "admit"         # a pending call may start; value_bytes -> its initial memory.high (or None)
DEFER = "defer"         # a pending call waits for room
ACTION_KINDS = (THROTTLE, FREEZE, THAW, RELAX, KILL, PROTECT, LIMIT, ADMIT, DEFER)
CALL_KINDS = frozenset({THROTTLE, FREEZE, THAW, RELAX, KILL, ADMIT, DEFER})


def check_priority(priority: str) -> str:
    if priority not in PRIORITY_RANK:
        raise InvalidInput(f"priority must be one of {', '.join(PRIORITIES)}, got {priority!r}")
    return priority


@dataclass(frozen=True)
class CallView:
    """A running tool call, as observed from its cgroup."""

    call_id: str
    tool: str
    usage_bytes: int
    peak_bytes: int
    age_s: float                       # since it started
    hint_bytes: int | None = None      # declared need (--mem-hint)
    frozen: bool = False
    throttle_level: int = 0            # 0 = not throttled


@dataclass(frozen=True)
class PendingCall:
    """A tool call that wants to start and waits for admission."""

    call_id: str
    tool: str
    hint_bytes: int | None = None
    waited_s: float = 0.0


@dataclass(frozen=True)
class SandboxView:
    name: str
    priority: str = "normal"
    usage_bytes: int = 0               # the whole sandbox: agent plus tool calls
    budget_bytes: int | None = None    # its own budget, if any
    psi_memory_some_avg10: float = 0.0  # percent
    calls: tuple[CallView, ...] = ()
    pending: tuple[PendingCall, ...] = ()


@dataclass(frozen=True)
class Event:
    """Something that happened since the previous snapshot."""

    time_s: float
    kind: str                          # "call_exit" | "oom_kill" | "threshold" (a kernel threshold crossed)
    sandbox: str
    call_id: str | None = None
    tool: str | None = None
    peak_bytes: int | None = None


@dataclass(frozen=True)
class Snapshot:
    time_s: float
    host_usage_bytes: int
    host_budget_bytes: int | None = None
    sandboxes: tuple[SandboxView, ...] = ()
    events: tuple[Event, ...] = ()

    def sandbox(self, name: str) -> SandboxView:
        for view in self.sandboxes:
            if view.name == name:
                return view
        raise KeyError(name)


@dataclass(frozen=True)
class Action:
    kind: str
    sandbox: str
    call_id: str | None
    value_bytes: int | None
    reason: str
    cpu_max_cores: float | None = None   # throttle: the cpu.max fallback where memory.high is missing
    cpu_weight: int | None = None        # protect
    message: str | None = None           # kill: what the agent is told

    def __post_init__(self) -> None:
        if self.kind not in ACTION_KINDS:
            raise InvalidInput(f"action kind must be one of {', '.join(ACTION_KINDS)}, got {self.kind!r}")
        if self.kind in CALL_KINDS and self.call_id is None:
            raise InvalidInput(f"a {self.kind} action needs a call_id: it acts on one tool call, never the agent")
        if not self.reason:
            raise InvalidInput(f"a {self.kind} action needs a reason")


S = TypeVar("S")


class SandboxPolicy(Protocol[S]):
    name: str

    def initial_state(self) -> S: ...

    def decide(self, snapshot: Snapshot, state: S) -> tuple[list[Action], S]: ...
