"""What a KV policy sees and what it answers: a snapshot in, directives out.

The engine (or the simulator, or the daemon from engine-protocol messages) builds a
`KvSnapshot` when something happens (`Trigger`) and calls `policy.decide(snapshot)`; the
policy answers a `Decision`: protocol `Directive`s plus, optionally, a time at which it
wants to be asked again (`wake_at_s`, a TICK). Policies learn from the protocol's
`RequestEvent`s through `observe`. Nothing here does I/O.

A "request" is one agent session's KV: an agent's LLM calls extend the same context, so
the KV of call i is the prefix of call i+1 (InferCept calls this a paused request).
"""
from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import NamedTuple, Protocol

from agentcg.engine_protocol import Bandwidth, ComputeCost, Directive, RequestEvent, Tier


class Trigger(str, enum.Enum):
    PAUSE = "pause"                  # `subject` finished an LLM call and is in a tool call
    PRESSURE = "pressure"            # `subject` needs `need_tokens` more GPU KV than is free
    HOST_PRESSURE = "host_pressure"  # the host KV pool must shrink by `need_bytes`
    TICK = "tick"                    # a wake-up the policy asked for


class State(str, enum.Enum):
    RUNNING = "running"    # admitted: prefilling or decoding
    WAITING = "waiting"    # its next LLM call arrived, not admitted yet
    PAUSED = "paused"      # in a tool call


class RequestView(NamedTuple):
    request_id: str
    session_id: str
    sandbox: str
    state: State
    turn: int                      # index of the session's current (or last) LLM call
    context_tokens: int            # the KV the session has, wherever it lives
    gpu_tokens: int
    host_tokens: int = 0
    ssd_tokens: int = 0
    pinned: bool = False           # on the GPU and not evictable
    copy_to_host_pending: bool = False
    arrival_s: float = 0.0         # when the current LLM call arrived
    session_start_s: float = 0.0
    admitted_s: float | None = None    # when it last entered RUNNING
    paused_s: float | None = None      # PAUSED: when the tool call began
    preempted_s: float | None = None   # last preemption, if it has not run since
    tool: str | None = None            # PAUSED: the tool (for Bash, "Bash:<first word>")
    is_last_step: bool = False         # ORACLE: the current/last call is the session's last
    tool_remaining_s: float | None = None  # ORACLE: time left in the tool call (InferCept)
    priority: int = 0                  # vLLM priority scheduling: lower is more important
    decoding: bool = False             # RUNNING and past prefill (harness.is_decoding)


@dataclass(frozen=True)
class KvSnapshot:
    now_s: float
    trigger: Trigger
    subject: str | None
    bytes_per_token: int
    gpu_capacity_tokens: int
    gpu_free_tokens: int           # unallocated
    gpu_evictable_tokens: int      # prefix-cache blocks nobody holds (evicted LRU on demand)
    host_capacity_bytes: int
    host_used_bytes: int
    ssd_capacity_bytes: int
    ssd_used_bytes: int
    bandwidths: tuple[Bandwidth, ...]
    cost: ComputeCost
    running_batch_tokens: int      # RUNNING requests past prefill (harness.running_batch_tokens)
    running_kv_tokens: int         # GPU KV of the running requests
    requests: tuple[RequestView, ...]
    need_tokens: int = 0           # PRESSURE
    need_bytes: int = 0            # HOST_PRESSURE

    def view(self, request_id: str | None) -> RequestView | None:
        for view in self.requests:
            if view.request_id == request_id:
                return view
        return None

    def bytes_per_s(self, src: Tier, dst: Tier) -> float:
        for bw in self.bandwidths:
            if bw.src == src and bw.dst == dst:
                return bw.bytes_per_s
        return 0.0

    @property
    def host_free_bytes(self) -> int:
        return max(0, self.host_capacity_bytes - self.host_used_bytes)


@dataclass(frozen=True)
class Decision:
    directives: tuple[Directive, ...] = ()
    wake_at_s: float | None = None


NO_DECISION = Decision()


class KvPolicy(Protocol):
    name: str
    shares_host_memory: bool       # True: the host KV pool shrinks when sandboxes need RAM

    def decide(self, snapshot: KvSnapshot) -> Decision: ...

    def observe(self, event: RequestEvent) -> None: ...

    def waiting_key(self, view: RequestView) -> tuple:
        """Sort key of the waiting queue: smallest is admitted first."""
        ...

