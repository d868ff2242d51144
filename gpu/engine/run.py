"""Running sessions on the reference engine: the entry point, calibration, the in-process driver.

    result = run_sessions(sessions, KVGeometry(4, 2, 32, "fp32", 16), "vllm-v1",
                          device_blocks=256, host_blocks=256, ssd_dir="/var/tmp", max_new_tokens=16)
    result.sessions[0].turns[1].output       # greedy tokens of the second LLM call
    result.bytes_moved("device", "host")     # bytes the store moved from the device to the host
"""
from __future__ import annotations

import collections
import os
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from agentcg.engine_protocol import (
    ComputeCost, DirectiveResult, EventKind, Message, Register, RequestEvent, decode, encode,
)
from agentcg.errors import InvalidInput
from agentcg.gpu.engine.engine import Engine, EngineLimits, EngineStats
from agentcg.gpu.engine.model import Feed, ModelConfig, RandomDecoder
from agentcg.gpu.engine.paged import PagedKV
from agentcg.gpu.engine.turns import SessionSpec, TurnResult
from agentcg.gpu.kvgeometry import KVGeometry
from agentcg.gpu.kvstore import TieredKVStore
from agentcg.policies.kv.types import KvPolicy

CALIBRATION_ID = "agentcg-engine-calibration"
MESSAGES_MAX = 65536


@dataclass(frozen=True)
class TierTraffic:
    src_tier: str
    dst_tier: str
    moves: int
    bytes: int
    seconds: float           # summed durations of the moves (they may overlap compute)


@dataclass(frozen=True)
class SessionResult:
    session_id: str
    start_s: float
    end_s: float
    turns: tuple[TurnResult, ...]

    @property
    def jct_s(self) -> float:
        return self.end_s - self.start_s


@dataclass(frozen=True)
class RunResult:
    policy: str
    device_kind: str
    register: Register
    sessions: tuple[SessionResult, ...]
    traffic: tuple[TierTraffic, ...]
    steps: int
    fed_tokens: int
    decode_tokens: int
    recomputed_tokens: int
    preemptions: int
    evictions: int
    refused_directives: int
    policy_errors: int
    fallbacks: int
    compute_s: float          # time inside model steps
    wall_s: float

    def bytes_moved(self, src_tier: str, dst_tier: str) -> int:
        return sum(t.bytes for t in self.traffic if (t.src_tier, t.dst_tier) == (src_tier, dst_tier))

    def outputs(self) -> dict[str, tuple[tuple[int, ...], ...]]:
        return {s.session_id: tuple(t.output for t in s.turns) for s in self.sessions}


class InProcessDriver:
    """The daemon's side of the engine protocol, in-process: keeps every message the engine
    emits (each round-tripped through the wire codec, so only valid messages pass) and
    sends directives. `on_message(driver, message)` may call `send()`."""

    def __init__(self, on_message: Callable[["InProcessDriver", Message], None] | None = None,
                 max_messages: int = MESSAGES_MAX, check_wire: bool = True) -> None:
        self.messages: collections.deque[Message] = collections.deque(maxlen=max_messages)
        self.on_message = on_message
        self.check_wire = check_wire
        self.engine: Engine | None = None

    def attach(self, engine: Engine) -> Register:
        self.engine = engine
        engine.listener = self.receive
        register = engine.register()
        self.receive(register)
        return register

    def receive(self, message: Message) -> None:
        if self.check_wire:
            message = decode(encode(message))
        self.messages.append(message)
        if self.on_message is not None:
            self.on_message(self, message)

    def send(self, directive) -> None:
        if self.engine is None:
            raise InvalidInput("driver: attach() an engine before sending directives")
        self.engine.submit(directive)

    def events(self, kind: EventKind | None = None) -> list[RequestEvent]:
        return [m for m in self.messages if isinstance(m, RequestEvent) and (kind is None or m.kind is kind)]

    def results(self) -> list[DirectiveResult]:
        return [m for m in self.messages if isinstance(m, DirectiveResult)]


def calibrate(engine: Engine, tokens: int = 64) -> None:
    """Measure what the engine registers: a model step of 1 and of `tokens` tokens (the
    linear step-time model) and one block through every tier path the store has."""
    store, model = engine.store, engine.model
    t = store.geometry.tokens_per_block
    n_blocks = -(-tokens // t)
    if store.usage().device.free_blocks < n_blocks:
        return
    store.allocate(CALIBRATION_ID, n_blocks)
    try:
        kv = PagedKV(store).view(CALIBRATION_ID)
        ids = torch.zeros(tokens, dtype=torch.long)
        model.step([Feed(kv, ids[:1], 0)])                    # warm-up
        start = time.perf_counter()
        model.step([Feed(kv, ids[:1], 0)])
        one = time.perf_counter() - start
        start = time.perf_counter()
        model.step([Feed(kv, ids, 0)])
        many = time.perf_counter() - start
        token_s = max(0.0, (many - one) / (tokens - 1))
        engine.cost = ComputeCost(step_fixed_s=max(one - token_s, 0.0), token_s=token_s,
                                  prefill_attn_s_per_token_pos=0.0, decode_kv_read_s_per_token=0.0,
                                  max_batched_tokens=engine.limits.max_batched_tokens,
                                  max_running=engine.limits.max_running)
        usage = store.usage()
        if usage.host.free_blocks >= n_blocks:
            store.swap_out(CALIBRATION_ID).wait()
            store.swap_in(CALIBRATION_ID).wait()
        if usage.ssd.free_blocks >= n_blocks:
            store.offload(CALIBRATION_ID).wait()
            store.load(CALIBRATION_ID).wait()
    finally:
        store.discard(CALIBRATION_ID)


def run_sessions(sessions: Sequence[SessionSpec], geometry: KVGeometry, policy: str | KvPolicy = "vllm-v1",
                 device_blocks: int = 256, host_blocks: int = 0, ssd_dir: str | os.PathLike | None = None,
                 max_new_tokens: int | None = None, *, ssd_blocks: int | None = None,
                 model: ModelConfig | None = None, device: str = "auto", max_batched_tokens: int = 512,
                 max_running: int = 16, time_scale: float = 1.0, max_turn_input_tokens: int | None = None,
                 arrival_interval_s: float = 0.0, seed: int = 0,
                 on_message: Callable[[InProcessDriver, Message], None] | None = None,
                 timeout_s: float | None = None, driver: Any = None) -> RunResult:
    """Run agent sessions (turns: prefill the new context, decode, pause for the trace's tool
    time x time_scale) on the reference engine with a fresh store and seeded random weights.

    The model runs where the store's device tier is (CUDA when torch sees a GPU and device
    is 'auto'); without `model` it is `ModelConfig.for_geometry(geometry)`, bf16 on CUDA,
    float32 on CPU. `ssd_blocks` defaults to 4 x device_blocks when ssd_dir is given.
    `driver` (anything with `attach(engine)`, e.g. a DaemonDriver to the agentcg daemon)
    replaces the in-process driver; `on_message` applies to the in-process one only."""
    if not sessions:
        raise InvalidInput("run_sessions: no sessions to run")
    if ssd_blocks is None:
        ssd_blocks = 4 * device_blocks if ssd_dir is not None else 0
    limits = EngineLimits(max_batched_tokens=max_batched_tokens, max_running=max_running, time_scale=time_scale,
                          max_new_tokens=max_new_tokens, max_turn_input_tokens=max_turn_input_tokens)
    if isinstance(policy, str):
        from agentcg.policies.kv import make_policy
        policy = make_policy(policy)
    with TieredKVStore(geometry, device_blocks, host_blocks, ssd_dir, ssd_blocks, on_full="error",
                       device=device) as store:
        pool_device = store.device.pool.device
        if model is None:
            dtype = torch.bfloat16 if pool_device.type == "cuda" else torch.float32
            model = ModelConfig.for_geometry(geometry, seed=seed, compute_dtype=dtype)
        decoder = RandomDecoder(model, pool_device)
        engine = Engine(store, decoder, policy, limits=limits, seed=seed)
        try:
            calibrate(engine)
            engine.stats = EngineStats()          # calibration moves are not the sessions' traffic
            if driver is None:
                driver = InProcessDriver(on_message)
            driver.attach(engine)
            register = engine.register()
            engine.t0 = engine.clock()
            for i, session in enumerate(sessions):
                engine.add_session(session, i * arrival_interval_s)
            start = time.monotonic()
            engine.run(timeout_s=timeout_s)
            wall = time.monotonic() - start
        finally:
            engine.close()
        st = engine.stats
        results = tuple(SessionResult(r.rid, r.start_s, r.results[-1].end_s if r.results else r.start_s,
                                      tuple(r.results)) for r in engine.reqs.values())
        traffic = tuple(TierTraffic(src, dst, st.moves[(src, dst)], st.bytes_moved[(src, dst)], st.move_s[(src, dst)])
                        for src, dst in sorted(st.bytes_moved))
        return RunResult(getattr(policy, "name", type(policy).__name__), store.device_kind, register, results,
                         traffic, st.steps, st.fed_tokens, st.decode_tokens, st.recomputed_tokens, st.preemptions,
                         st.evictions, st.refused_directives, st.policy_errors, st.fallbacks, st.step_s, wall)
