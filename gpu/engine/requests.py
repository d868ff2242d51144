"""The reference engine's typed values: its limits, its counters, and one request (an
agent session's KV chain) with the states it moves through."""
from __future__ import annotations

import collections
import math
from dataclasses import dataclass, field

from agentcg.engine_protocol import Tier
from agentcg.errors import InvalidInput
from agentcg.gpu.engine.turns import EngineSession, TurnResult
from agentcg.gpu.kvstore import Transfer

PENDING, WAITING, RUNNING, PAUSED, DONE = "pending", "waiting", "running", "paused", "done"
TIER_OF = {"device": Tier.GPU, "host": Tier.HOST, "ssd": Tier.SSD}


@dataclass(frozen=True)
class EngineLimits:
    max_batched_tokens: int = 512     # tokens per model step, prefill chunks and decodes together
    max_running: int = 16
    time_scale: float = 1.0           # tool-call durations are multiplied by this
    max_new_tokens: int | None = None  # cap on each turn's output tokens
    max_turn_input_tokens: int | None = None  # cap on each turn's new context tokens

    def __post_init__(self) -> None:
        if self.max_batched_tokens < 1 or self.max_running < 1:
            raise InvalidInput("engine: max_batched_tokens and max_running must be at least 1")
        if not (self.time_scale >= 0 and math.isfinite(self.time_scale)):
            raise InvalidInput(f"engine: time_scale must be a finite non-negative number, got {self.time_scale!r}")


@dataclass
class _Req:
    session: EngineSession
    index: int
    start_s: float
    state: str = PENDING
    turn: int = 0
    tokens: list[int] = field(default_factory=list)
    kv_tokens: int = 0
    hwm: int = 0                    # tokens whose KV was ever computed
    out_left: int = 0
    allocated: bool = False         # the store knows the request
    pinned: bool = False
    evictable_since: float | None = None
    ttl_deadline: float | None = None
    loading: Transfer | None = None
    resume_at: float | None = None
    arrival_s: float = 0.0
    admitted_s: float | None = None
    paused_s: float | None = None
    preempted_s: float | None = None
    turn_admitted_s: float | None = None
    turn_first_token_s: float | None = None
    turn_cached: int = 0
    turn_prompt: int = 0
    turn_recomputed: int = 0
    turn_output: list[int] = field(default_factory=list)
    results: list[TurnResult] = field(default_factory=list)

    @property
    def rid(self) -> str:
        return self.session.session_id


@dataclass
class EngineStats:
    steps: int = 0
    fed_tokens: int = 0
    decode_tokens: int = 0
    recomputed_tokens: int = 0
    preemptions: int = 0
    evictions: int = 0
    policy_errors: int = 0
    refused_directives: int = 0
    fallbacks: int = 0
    step_s: float = 0.0
    bytes_moved: dict[tuple[str, str], int] = field(default_factory=lambda: collections.defaultdict(int))
    moves: dict[tuple[str, str], int] = field(default_factory=lambda: collections.defaultdict(int))
    move_s: dict[tuple[str, str], float] = field(default_factory=lambda: collections.defaultdict(float))
