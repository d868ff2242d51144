"""The reference engine: continuous batching over paged KV in the tiered store.

Each iteration: due tool calls return (RESUMED, their new context tokens appended), queued
directives are applied, waiting requests are admitted in the policy's order while device
blocks allow (a request whose KV is on host or SSD is loaded first and admitted once the
load has landed), then every running request is fed its pending tokens (a prefill chunk,
or the one token sampled last step) in one model step, and greedy-samples its next token.

A request is one agent session's KV chain (as in `agentcg.policies.kv.types`): its token
list is the whole context (inputs and generated tokens), `kv_tokens` the prefix whose KV is
stored. A request whose KV was dropped recomputes it by feeding its tokens again.

Memory: a running request that cannot get blocks first evicts prefix-cache KV (paused or
preempted requests the policy left evictable, least recently released first), then asks
the policy (PRESSURE) and applies its directives; if that frees nothing, vLLM's rule
preempts the newest running request. The store holds one copy of each block, so
SWAP_TO_HOST with keep_gpu_copy is refused, a partial swap (`tokens`) moves all the
request's blocks, and DISCARD of one tier drops the whole KV (recompute on resume).
"""
from __future__ import annotations

import collections
import math
import time
from typing import Callable

import torch

from agentcg.engine_protocol import (
    Bandwidth, ComputeCost, Directive, DirectiveResult, EventKind, KvGeometry, KvUsage, Message, Register,
    RequestEvent, Tier, TierCapacity,
)
from agentcg.errors import InvalidInput
from agentcg.gpu.engine.directives import DirectiveHandling
from agentcg.gpu.engine.model import Feed, RandomDecoder
from agentcg.gpu.engine.requests import (
    DONE, PAUSED, PENDING, RUNNING, TIER_OF, WAITING, EngineLimits, EngineStats, _Req,
)
from agentcg.gpu.engine.paged import PagedKV, blocks_for
from agentcg.gpu.engine.turns import EngineSession, TurnResult, turn_input_tokens
from agentcg.gpu.kvgeometry import KVTierFull, TransferRecord
from agentcg.gpu.kvstore import TieredKVStore, Transfer
from agentcg.policies.kv.harness import KvDecider, build_snapshot, is_decoding
from agentcg.policies.kv.types import KvPolicy, KvSnapshot, RequestView, State, Trigger
from agentcg.policies.kv.vllm_v1 import VllmV1Policy

MAX_PRESSURE_ROUNDS = 32
MAX_IDLE_SLEEP_S = 0.05
DIRECTIVE_QUEUE_MAX = 4096


class Engine(DirectiveHandling):
    """One engine over one store and one model; `add_session()` then `run()`."""

    def __init__(self, store: TieredKVStore, model: RandomDecoder, policy: KvPolicy, *,
                 limits: EngineLimits = EngineLimits(), seed: int = 0, engine_id: str = "agentcg-ref-engine",
                 listener: Callable[[Message], None] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        model.config.check_geometry(store.geometry)
        if store.on_full != "error":
            raise InvalidInput("engine: the store must be opened with on_full='error' (the engine decides placement)")
        self.store, self.model, self.policy, self.limits = store, model, policy, limits
        self.paged = PagedKV(store)
        self.T = store.geometry.tokens_per_block
        self.bytes_per_token = store.geometry.bytes_per_token
        self.seed, self.engine_id = seed, engine_id
        self.listener = listener
        self.clock = clock
        self.t0 = clock()
        self.fallback = VllmV1Policy()
        self.decider = KvDecider(policy, fallback=self.fallback)   # the one KV decision harness
        self.passive = False     # True while a daemon decides for this engine (DaemonDriver): no local policy
        self.stats = EngineStats()
        self.reqs: dict[str, _Req] = {}
        self.running: list[_Req] = []
        self.waiting: list[_Req] = []
        self.inbox: collections.deque[Directive] = collections.deque(maxlen=DIRECTIVE_QUEUE_MAX)
        self.wake_at: float | None = None
        self.cost = ComputeCost(step_fixed_s=1e-3, token_s=1e-4, prefill_attn_s_per_token_pos=0.0,
                                decode_kv_read_s_per_token=0.0, max_batched_tokens=limits.max_batched_tokens,
                                max_running=limits.max_running)
        self._bw: dict[tuple[Tier, Tier], float] = {}
        self._prev_on_record = store._on_record
        store._on_record = self._on_record  # the store's record hook: count bytes per tier pair

    # ---- protocol ------------------------------------------------------------------
    def now(self) -> float:
        return self.clock() - self.t0

    def _emit(self, message: Message) -> None:
        if self.listener is not None:
            self.listener(message)

    def register(self) -> Register:
        g = self.store.geometry
        usage = self.store.usage()
        tiers = tuple(TierCapacity(TIER_OF[t.tier], t.capacity_bytes) for t in (usage.device, usage.host, usage.ssd))
        return Register(self.engine_id, f"random-weights {self.model.config.layers}L", KvGeometry(
            g.layers, g.kv_heads, g.head_dim, g.dtype.itemsize, g.tokens_per_block), tiers, self.bandwidths, self.cost)

    @property
    def bandwidths(self) -> tuple[Bandwidth, ...]:
        return tuple(Bandwidth(src, dst, bw) for (src, dst), bw in sorted(self._bw.items()))

    def _on_record(self, record: TransferRecord) -> None:
        key = (record.src_tier, record.dst_tier)
        self.stats.bytes_moved[key] += record.bytes
        self.stats.moves[key] += 1
        self.stats.move_s[key] += record.duration_s
        if record.duration_s > 0 and record.src_tier != record.dst_tier:
            pair = (TIER_OF[record.src_tier], TIER_OF[record.dst_tier])
            old = self._bw.get(pair)
            self._bw[pair] = record.bandwidth_bytes_per_s if old is None else 0.8 * old + 0.2 * record.bandwidth_bytes_per_s
        if self._prev_on_record is not None:
            self._prev_on_record(record)

    def submit(self, directive: Directive) -> None:
        """Queue a directive from outside (the daemon); applied at the next iteration, its
        DirectiveResult goes to the listener."""
        if len(self.inbox) == self.inbox.maxlen:
            self._emit(DirectiveResult(directive.request_id, directive.action, False, "directive queue full"))
            return
        self.inbox.append(directive)

    def _event(self, kind: EventKind, r: _Req, cached: int | None = None) -> None:
        tool = tool_call = None
        sandbox = r.session.sandbox
        if kind is EventKind.PAUSED:
            tool = r.session.turns[r.turn].tool or "unknown"
            tool_call = f"{r.rid}/{r.turn}"
        event = RequestEvent(r.rid, r.rid, kind, self.now(), len(r.tokens), sandbox=sandbox, tool=tool,
                             tool_call_id=tool_call, cached_tokens=cached)
        if not self.passive:
            self.decider.observe(event)
        self._emit(event)

    def _usage(self, r: _Req) -> None:
        dev, host, ssd = self._tier_tokens(r)
        self._emit(KvUsage(r.rid, self.now(), dev, host, ssd, pinned=r.pinned))

    def _tier_tokens(self, r: _Req) -> tuple[int, int, int]:
        if not r.allocated or r.kv_tokens == 0:
            return 0, 0, 0
        p = self.store.placement(r.rid)
        total = p.device_blocks + p.host_blocks + p.ssd_blocks
        share = [min(r.kv_tokens, n * self.T) if total else 0 for n in p]
        return share[0], share[1], share[2]

    # ---- sessions --------------------------------------------------------------------
    def add_session(self, session: EngineSession, start_s: float = 0.0) -> None:
        if session.session_id in self.reqs:
            raise InvalidInput(f"engine: session id {session.session_id!r} is already in use")
        if not session.turns:
            raise InvalidInput(f"engine: session {session.session_id!r} has no turns")
        r = _Req(session, len(self.reqs), start_s, resume_at=start_s)
        self.reqs[r.rid] = r

    def _arrive(self, r: _Req) -> None:
        if r.state == PAUSED:
            r.turn += 1
            self._event(EventKind.RESUMED, r)
        turn = r.session.turns[r.turn]
        n_new = turn_input_tokens(turn, len(r.tokens), self.limits.max_turn_input_tokens)
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + r.index * 10_007 + r.turn)
        r.tokens += torch.randint(0, self.model.config.vocab, (n_new,), generator=gen).tolist()
        out = turn.output_tokens if self.limits.max_new_tokens is None else min(turn.output_tokens, self.limits.max_new_tokens)
        r.out_left = max(1, out)
        r.state, r.resume_at = WAITING, None
        r.arrival_s, r.paused_s, r.preempted_s, r.admitted_s = self.now(), None, None, None
        r.ttl_deadline = None
        r.turn_admitted_s = r.turn_first_token_s = None
        r.turn_cached = r.turn_recomputed = 0
        r.turn_output = []
        r.turn_prompt = len(r.tokens)
        self.waiting.append(r)

    def _finish_turn(self, r: _Req) -> None:
        now = self.now()
        self.running.remove(r)
        turn = r.session.turns[r.turn]
        r.results.append(TurnResult(r.turn, r.turn_prompt, len(r.turn_output), r.arrival_s,
                                    r.turn_admitted_s or now, r.turn_first_token_s or now, now, r.turn_cached,
                                    r.turn_recomputed, tuple(r.turn_output)))
        r.admitted_s = None
        if r.turn == len(r.session.turns) - 1:
            r.state = DONE
            self._drop(r)
            self._event(EventKind.FINISHED, r)
            return
        r.state, r.paused_s = PAUSED, now
        r.resume_at = now + turn.tool_s * self.limits.time_scale
        self._event(EventKind.PAUSED, r)
        self._make_evictable(r)               # vLLM's default: the blocks go to the prefix cache
        self._ask(Trigger.PAUSE, r)
        self._usage(r)

    # ---- KV placement ------------------------------------------------------------------
    def _drop(self, r: _Req) -> None:
        if r.allocated:
            self.store.discard(r.rid)
        self.paged.forget(r.rid)
        r.allocated, r.kv_tokens, r.loading = False, 0, None
        r.pinned, r.evictable_since, r.ttl_deadline = False, None, None

    def _make_evictable(self, r: _Req) -> None:
        r.pinned, r.ttl_deadline = False, None
        if r.allocated and r.evictable_since is None:
            r.evictable_since = self.now()

    def _on_device(self, r: _Req) -> bool:
        if not r.allocated:
            return False
        p = self.store.placement(r.rid)
        return p.host_blocks == 0 and p.ssd_blocks == 0

    def _free_blocks(self) -> int:
        return self.store.usage().device.free_blocks

    def _evict(self, need_blocks: int, keep: _Req | None) -> bool:
        """Free device blocks by dropping prefix-cache KV, least recently released first."""
        if self._free_blocks() < need_blocks and self.store.usage().transfers_in_flight:
            self.store.synchronize()
        victims = sorted((r for r in self.reqs.values() if r.evictable_since is not None and r is not keep
                          and r.allocated and self.store.placement(r.rid).device_blocks),
                         key=lambda r: r.evictable_since)
        for r in victims:
            if self._free_blocks() >= need_blocks:
                break
            self._drop(r)
            self.stats.evictions += 1
        return self._free_blocks() >= need_blocks

    def _grow(self, r: _Req, tokens: int) -> bool:
        """Blocks for `tokens` positions on the device; False if r itself was preempted."""
        need = blocks_for(tokens, self.T) - (len(self.paged.slots(r.rid)) if r.allocated else 0)
        if need <= 0:
            return True
        capacity = self.store.usage().device.capacity_blocks
        if blocks_for(tokens, self.T) > capacity:
            raise KVTierFull(f"engine: request {r.rid!r} has a {tokens}-token context, {blocks_for(tokens, self.T)} "
                             f"blocks, more than the {capacity} device blocks; raise device_blocks")
        for _ in range(MAX_PRESSURE_ROUNDS):
            if self._evict(need, keep=r):
                self.store.allocate(r.rid, need)
                r.allocated = True
                self.paged.forget(r.rid)
                return True
            before = (len(self.running), self._free_blocks())
            self._ask(Trigger.PRESSURE, r, need_tokens=(need - self._free_blocks()) * self.T)
            if r.state != RUNNING:
                return False
            if self._evict(need, keep=r):
                continue
            if (len(self.running), self._free_blocks()) == before:
                self.stats.fallbacks += 1
                # the engine's own rule (vLLM's), also when passive: nothing else frees blocks now
                for d in self.decider.decide_fallback(self._snapshot(Trigger.PRESSURE, r, need * self.T)).directives:
                    self._apply(d)
                if r.state != RUNNING:
                    return False
                if (len(self.running), self._free_blocks()) == before:
                    break
        raise KVTierFull(f"engine: request {r.rid!r} needs {need} more device blocks and nothing can be freed; "
                         f"raise device_blocks (a {tokens}-token context needs {blocks_for(tokens, self.T)})")

    # ---- policy ----------------------------------------------------------------------
    def _view(self, r: _Req) -> RequestView:
        now = self.now()
        state = {RUNNING: State.RUNNING, PAUSED: State.PAUSED}.get(r.state, State.WAITING)
        dev, host, ssd = self._tier_tokens(r)
        turns = r.session.turns
        remaining = None
        if r.state == PAUSED and r.resume_at is not None:
            remaining = max(0.0, r.resume_at - now)
        return RequestView(
            r.rid, r.rid, r.session.sandbox, state, r.turn, len(r.tokens), dev, host, ssd,
            pinned=r.pinned, copy_to_host_pending=False, arrival_s=r.arrival_s, session_start_s=r.start_s,
            admitted_s=r.admitted_s, paused_s=r.paused_s, preempted_s=r.preempted_s,
            tool=turns[r.turn].tool if r.state == PAUSED else None, is_last_step=r.turn == len(turns) - 1,
            tool_remaining_s=remaining,
            # past prefill: every token but the one sampled last step has its KV
            decoding=r.state == RUNNING and is_decoding(r.kv_tokens, len(r.tokens) - 1))

    def _snapshot(self, trigger: Trigger, subject: _Req | None, need_tokens: int = 0) -> KvSnapshot:
        usage = self.store.usage()
        live = [r for r in self.reqs.values() if r.state in (RUNNING, WAITING, PAUSED)]
        evictable = sum(self._tier_tokens(r)[0] for r in live if r.evictable_since is not None)
        return build_snapshot(
            now_s=self.now(), trigger=trigger, subject=subject.rid if subject else None,
            views=(self._view(r) for r in live), bytes_per_token=self.bytes_per_token,
            gpu_capacity_tokens=usage.device.capacity_blocks * self.T, gpu_free_tokens=usage.device.free_blocks * self.T,
            gpu_evictable_tokens=evictable, host_capacity_bytes=usage.host.capacity_bytes,
            host_used_bytes=usage.host.used_bytes, ssd_capacity_bytes=usage.ssd.capacity_bytes,
            ssd_used_bytes=usage.ssd.used_bytes, bandwidths=self.bandwidths, cost=self.cost, need_tokens=need_tokens)

    def _ask(self, trigger: Trigger, subject: _Req | None, need_tokens: int = 0) -> None:
        if self.passive:
            return       # the daemon decides; its directives arrive through submit()
        snap = self._snapshot(trigger, subject, need_tokens)
        errors = self.decider.errors
        decision = self.decider.decide(snap)   # never raises: vllm-v1 decides for a failing policy
        self.stats.policy_errors += self.decider.errors - errors
        if decision.wake_at_s is not None:     # clamped by the harness
            self.wake_at = decision.wake_at_s if self.wake_at is None else min(self.wake_at, decision.wake_at_s)
        for d in decision.directives:
            self._apply(d)

    # ---- the loop ----------------------------------------------------------------------
    @property
    def active(self) -> bool:
        return any(r.state != DONE for r in self.reqs.values())

    def _timers(self) -> None:
        now = self.now()
        for r in sorted(self.reqs.values(), key=lambda r: (r.resume_at or 0.0, r.index)):
            if r.state in (PENDING, PAUSED) and r.resume_at is not None and r.resume_at <= now:
                self._arrive(r)
            if r.state in (PAUSED, WAITING) and r.ttl_deadline is not None and r.ttl_deadline <= now:
                self._make_evictable(r)
        if self.wake_at is not None and self.wake_at <= now:
            self.wake_at = None
            self._ask(Trigger.TICK, None)

    def _admit(self) -> None:
        keys = {r.rid: (r.arrival_s, r.rid) if self.passive else self.decider.waiting_key(self._view(r))
                for r in self.waiting}
        self.waiting.sort(key=lambda r: keys[r.rid])
        for r in list(self.waiting):
            if len(self.running) >= self.limits.max_running:
                break
            if r.allocated and not self._on_device(r) and r.loading is None:
                if not self._bring_back(r):
                    self._ask(Trigger.PRESSURE, r, need_tokens=r.kv_tokens)
                    if not self._bring_back(r):
                        break
            if r.loading is not None:
                if not r.loading.done():
                    continue
                r.loading.wait()
                r.loading = None
            if r.kv_tokens == 0 and r.allocated:
                self._drop(r)              # blocks without valid KV (preempted before its first step)
            first = min(len(r.tokens) - r.kv_tokens, self.limits.max_batched_tokens)
            need = blocks_for(r.kv_tokens + first, self.T) - (len(self.paged.slots(r.rid)) if r.allocated else 0)
            if need > 0 and not self._evict(need, keep=r):
                self._ask(Trigger.PRESSURE, r, need_tokens=(need - self._free_blocks()) * self.T)
                if not self._evict(need, keep=r) and self.running:
                    break                  # vLLM: the first request that does not fit stops admission
            self.waiting.remove(r)
            r.state, r.admitted_s = RUNNING, self.now()
            r.pinned, r.evictable_since, r.ttl_deadline = False, None, None
            if r.turn_admitted_s is None:
                r.turn_admitted_s, r.turn_cached = r.admitted_s, r.kv_tokens
            self.running.append(r)
            self._event(EventKind.ADMITTED, r, cached=r.kv_tokens)

    def step(self) -> bool:
        """One iteration; False when nothing could run (the caller may wait)."""
        self._timers()
        while self.inbox:
            self._apply(self.inbox.popleft())
        self._admit()
        budget = self.limits.max_batched_tokens
        plan: list[tuple[_Req, int]] = []
        for r in list(self.running):
            if budget <= 0:
                break
            if r.state != RUNNING:
                continue
            n = min(len(r.tokens) - r.kv_tokens, budget)
            if not self._grow(r, r.kv_tokens + n):
                continue
            plan.append((r, n))
            budget -= n
        plan = [(r, n) for r, n in plan if r.state == RUNNING]
        if not plan:
            return False
        start = time.perf_counter()
        feeds = [Feed(self.paged.view(r.rid), torch.tensor(r.tokens[r.kv_tokens:r.kv_tokens + n]), r.kv_tokens)
                 for r, n in plan]
        samples = self.model.step(feeds)
        elapsed = time.perf_counter() - start
        self.stats.steps += 1
        self.stats.step_s += elapsed
        fed = sum(n for _, n in plan)
        self.stats.fed_tokens += fed
        now = self.now()
        for (r, n), token in zip(plan, samples):
            recomputed = max(0, min(r.kv_tokens + n, r.hwm) - r.kv_tokens)
            r.turn_recomputed += recomputed
            self.stats.recomputed_tokens += recomputed
            r.kv_tokens += n
            r.hwm = max(r.hwm, r.kv_tokens)
            if r.kv_tokens < len(r.tokens):
                continue                 # a prefill chunk: more of the context to feed
            if n == 1 and recomputed == 0:
                self.stats.decode_tokens += 1
            r.tokens.append(token)
            r.turn_output.append(token)
            r.out_left -= 1
            if r.turn_first_token_s is None:
                r.turn_first_token_s = now
            if r.out_left == 0:
                self._finish_turn(r)
        return True

    def _next_timer_s(self) -> float:
        times = [r.resume_at for r in self.reqs.values() if r.state in (PENDING, PAUSED) and r.resume_at is not None]
        times += [r.ttl_deadline for r in self.reqs.values() if r.ttl_deadline is not None]
        if self.wake_at is not None:
            times.append(self.wake_at)
        return min(times, default=math.inf)

    def run(self, timeout_s: float | None = None) -> None:
        """Until every session finished; TimeoutError after timeout_s of wall time."""
        deadline = None if timeout_s is None else self.clock() + timeout_s
        while self.active:
            if deadline is not None and self.clock() > deadline:
                raise TimeoutError(f"engine: sessions not finished after {timeout_s} s")
            if self.step():
                continue
            loading = [r.loading for r in self.waiting if r.loading is not None and not r.loading.done()]
            if loading:
                _wait_some(loading[0])
                continue
            wait = self._next_timer_s() - self.now()
            if wait == math.inf and not self.running and not self.inbox:
                stuck = self._unstick()
                if not stuck:
                    raise RuntimeError("engine: waiting requests cannot be admitted and nothing will change; "
                                       "device_blocks is too small for the longest context")
                continue
            if wait > 0:
                time.sleep(min(wait, MAX_IDLE_SLEEP_S))
            elif not self.running and self.waiting and not self._unstick():
                time.sleep(min(MAX_IDLE_SLEEP_S, 1e-3))

    def _unstick(self) -> bool:
        """Nothing runs and the head of the queue cannot get device memory because pinned
        KV holds it: release the oldest pinned paused KV to the prefix cache."""
        head = self.waiting[0] if self.waiting else None
        pinned = sorted((r for r in self.reqs.values() if r.state in (PAUSED, WAITING) and r.pinned
                         and r is not head and r.loading is None),
                        key=lambda r: (r.state != PAUSED, r.paused_s or 0.0))
        if not pinned:
            return False
        self.stats.fallbacks += 1
        self._make_evictable(pinned[0])
        return True

    def close(self) -> None:
        self.store._on_record = self._prev_on_record


def _wait_some(transfer: Transfer) -> None:
    try:
        transfer.wait(timeout_s=MAX_IDLE_SLEEP_S)
    except TimeoutError:
        pass
