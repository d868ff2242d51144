"""`agentcg kv simulate`: KV-cache policies against a cost model of one inference engine.

The simulated engine is vLLM V1's continuous batching, the same for every policy: each
step decodes one token for every decoding request and spends the rest of the token budget
on prefill chunks (running requests first, then waiting ones in the policy's order; a
waiting request that does not fit stops admission). KV is counted in tokens; prefix hits
are whole blocks and at most prompt - 1 tokens. Evictable KV (the prefix cache) is freed
LRU, tail blocks first. Transfers run on their own links (GPU->host, host->GPU, host->SSD,
SSD->GPU), first come first served, at the model's bandwidths; swapped-out GPU memory is
free only when its copy lands; a request whose KV is coming back waits for it.

Sessions start together (or `arrival_interval_s` apart); the next call of a session
arrives its recorded tool gap after the previous one finished. The policy is asked on
every pause, whenever a step does not fit in GPU memory (PRESSURE, repeated until it
fits), when the host pool must shrink (HOST_PRESSURE, only for policies that share host
memory with the sandboxes) and at the times it asks for (TICK). A policy that raises is
replaced for that decision by vllm-v1 and counted; a directive for an unknown request or
one the engine cannot carry out (a full tier) is refused and counted.

Measured per policy: job (session) completion time, GPU KV waste (GB·s: GPU KV pinned
for requests that are not computing, plus, while recomputed tokens are prefilled, their
share of each step times the running requests' KV, as InferCept counts it), recomputed
tokens, bytes moved per link, peak host KV memory.

Host memory (the sandboxes' recorded curves, fixed or following pools, OOM kills) is in
`kvsim_host.py`; where KV lives and how it moves in `kvsim_tiers.py`; views, snapshots and
directives in `kvsim_directives.py`; the configuration, result and request state in
`kvsim_state.py`; the shared prefix is held once per tier (`strip_shared_prefix`); every
decision goes through the one harness (`agentcg.policies.kv.harness`).

Steps whose batch does not change are advanced together (their times form an arithmetic
series), so thousands of sessions take seconds.
"""
from __future__ import annotations

import dataclasses
import heapq
import math
import time
from collections import OrderedDict

from agentcg.engine_protocol import Bandwidth, EventKind, RequestEvent, Tier
from agentcg.errors import InvalidInput
from agentcg.policies.kv import make_policy
from agentcg.policies.kv.agentcg import HostMemoryBudget
from agentcg.policies.kv.infercept import InferceptParams
from agentcg.policies.kv.harness import KvDecider
from agentcg.policies.kv.types import KvPolicy, Trigger
from agentcg.policies.kv.vllm_v1 import prefix_hit_tokens
from agentcg.profiler.kvsim_directives import PolicyBridge
from agentcg.profiler.kvsim_host import HostMemory
from agentcg.profiler.kvsim_sessions import SimSession
from agentcg.profiler.kvsim_state import (
    DONE, GB, PAUSED, PENDING, RUNNING, WAITING, PolicyResult, SimConfig, _Link, _Sess)
from agentcg.profiler.kvsim_tiers import KvTiers

MAX_PRESSURE_ROUNDS = 512
MAX_STEPS_PER_ADVANCE = 1_000_000
MAX_SPINS_AT_ONE_TIME = 10_000


class Simulator(HostMemory, KvTiers, PolicyBridge):
    def __init__(self, sessions: list[SimSession], policy: "str | KvPolicy", config: SimConfig, **policy_params) -> None:
        if not sessions:
            raise InvalidInput("no sessions to simulate")
        self.cfg = config
        self.model = config.model
        self.cost = config.model.cost
        self.bpt = config.model.bytes_per_token
        self.prefix = config.shared_prefix_tokens
        self.prefix_holders = {"host": 0, "ssd": 0}
        self.cap = config.gpu_kv_bytes // self.bpt - self.prefix    # the shared prefix stays resident
        if self.cap < 1024:
            raise InvalidInput(f"GPU KV capacity {config.gpu_kv_bytes} bytes holds under 1024 tokens; raise --gpu-kv")
        longest = max(sessions, key=lambda x: max(t.input_tokens + t.output_tokens for t in x.turns))
        need = max(t.input_tokens + t.output_tokens for t in longest.turns)
        if need > self.cap:
            raise InvalidInput(f"GPU KV holds {self.cap:,} tokens but session {longest.session_id} needs {need:,} "
                               f"at once; raise --gpu-kv or --gpu-kv-fraction")
        self.policy = make_policy(policy, **policy_params) if isinstance(policy, str) else policy
        self.decider = KvDecider(self.policy)
        self.pool_bytes = config.host_kv_static_bytes if self.decider.host_tier else 0
        label = self.decider.name
        if not self.decider.shares_host_memory and self.decider.host_tier:
            label += f":{config.host_pool}"
        self.result = PolicyResult(self.decider.name, len(sessions), [], label=label,
                                   host_pool_bytes=0 if self.decider.shares_host_memory else self.pool_bytes)
        self.now = 0.0
        self.sess = [_Sess(s, i, i * config.arrival_interval_s) for i, s in enumerate(sessions)]
        self.by_id = {s.rid: s for s in self.sess}
        if len(self.by_id) != len(self.sess):
            raise InvalidInput("session ids must be unique")
        self.running: list[_Sess] = []
        self.waiting: list[_Sess] = []
        self.waiting_dirty = True
        self.lru: OrderedDict[str, _Sess] = OrderedDict()
        self.gpu_used = 0
        self.evictable_tokens = 0
        self.host_used = 0          # tokens
        self.ssd_used = 0
        self.sandbox_bytes = 0
        self.active = len(self.sess)
        self.events: list[tuple[float, int, str, _Sess | None, int]] = []
        self.seq = 0
        self.wake_at: float | None = None
        self.links = {
            "gpu_to_host": _Link("gpu_to_host", self.model.d2h_bytes_per_s),
            "host_to_gpu": _Link("host_to_gpu", self.model.h2d_bytes_per_s),
            "host_to_ssd": _Link("host_to_ssd", self.model.ssd_write_bytes_per_s),
            "ssd_to_gpu": _Link("ssd_to_gpu", self.model.ssd_read_bytes_per_s),
        }
        self.bandwidths = (
            Bandwidth(Tier.GPU, Tier.HOST, self.model.d2h_bytes_per_s),
            Bandwidth(Tier.HOST, Tier.GPU, self.model.h2d_bytes_per_s),
            Bandwidth(Tier.HOST, Tier.SSD, self.model.ssd_write_bytes_per_s),
            Bandwidth(Tier.SSD, Tier.GPU, self.model.ssd_read_bytes_per_s),
        )
        self.budget = HostMemoryBudget(config.host_memory_bytes, config.host_reserve_bytes)
        for s in self.sess:
            self._push(s.start_s, "arrive", s)

    # -- events ---------------------------------------------------------------------
    def _push(self, at: float, kind: str, sess: _Sess | None, epoch: int = 0) -> None:
        self.seq += 1
        heapq.heappush(self.events, (at, self.seq, kind, sess, epoch))

    def _next_event_s(self) -> float:
        return self.events[0][0] if self.events else math.inf

    def _handle(self, kind: str, s: _Sess | None, epoch: int) -> None:
        if kind == "arrive":
            if s.state == PENDING or (s.state == PAUSED and epoch == s.gap_epoch):
                self._arrive(s)
        elif kind == "mem":
            if s.state == PAUSED and epoch == s.gap_epoch:
                self._mem_step(s)
        elif kind == "wake":
            if self.decider.take_wake(self.now):
                self.wake_at = None
                self._ask(Trigger.TICK, None)
        elif kind == "ttl":
            if s.state == PAUSED and s.pinned and s.ttl_deadline is not None and s.ttl_deadline <= self.now:
                self._make_evictable(s)
        elif kind == "release" and epoch == s.epoch:
            if s.pending_release and s.state == PAUSED:
                self._gpu_drop_tail(s, s.pending_release)
            s.pending_release = 0
        elif kind == "ssd_done" and epoch == s.epoch:
            if s.host is not None and s.ssd is not None:
                self._set_host(s, None)

    # -- sessions -------------------------------------------------------------------
    def _arrive(self, s: _Sess) -> None:
        turn = s.turn_spec
        if s.state == PENDING:
            s.turn = 0
            shared = 0
            first = turn.memory[0][1] if turn.memory else turn.sandbox_bytes
            if self.cfg.sandbox_memory:
                self._set_sandbox(s, first)
        else:
            prev = s.spec.turns[s.turn - 1]
            if self.cfg.sandbox_memory and prev.call_bytes is not None and prev.call_bytes < s.sandbox:
                self._set_sandbox(s, prev.call_bytes)
            s.kills, s.give_up = 0, False
            self._event(EventKind.RESUMED, s)
            prev_input = s.spec.turns[s.turn - 1].input_tokens
            shared = 0 if turn.input_tokens < prev_input else min(turn.input_tokens, s.ctx)
        if shared < s.ctx:                      # the context diverged: the tail is useless
            s.ctx = shared
            s.hwm = min(s.hwm, shared)
            if s.g > shared:
                self._gpu_set(s, shared)
            for name in ("host", "ssd"):
                seg = getattr(s, name)
                if seg and seg[1] > shared:
                    clipped = (seg[0], shared) if seg[0] < shared else None
                    (self._set_host if name == "host" else self._set_ssd)(s, clipped)
        s.state = WAITING
        s.prompt, s.out = turn.input_tokens, turn.output_tokens
        s.prefilled = s.decoded = 0
        s.first_token = False
        s.arrival_s, s.paused_s, s.preempted_s = self.now, None, None
        s.admitted_s = None
        if s.ttl_deadline is not None:
            s.ttl_deadline = None               # Continuum: a pin does not expire while its job waits
        self.waiting.append(s)
        self.waiting_dirty = True

    def _event(self, kind: EventKind, s: _Sess, cached: int | None = None) -> None:
        tool = s.spec.turns[s.turn - 1].tool if kind is EventKind.PAUSED else None
        event = RequestEvent(s.rid, s.rid, kind, self.now, s.ctx if kind is not EventKind.ADMITTED else s.prompt,
                             sandbox=s.spec.sandbox, tool=tool, cached_tokens=cached)
        self.decider.observe(event)

    def _finish_call(self, s: _Sess) -> None:
        self.running.remove(s)
        s.ctx = s.prompt + s.out - 1           # the last sampled token has no KV yet
        s.hwm = max(s.hwm, s.ctx)
        s.admitted_s = None
        turn = s.turn_spec
        if s.turn == len(s.spec.turns) - 1:   # the last call: the session is done
            s.state = DONE
            self._drop_all(s)
            self.active -= 1
            self.result.jct_s.append(self.now - s.start_s)
            self._event(EventKind.FINISHED, s)
            if self.cfg.sandbox_memory:
                self._set_sandbox(s, 0)
            return
        s.state = PAUSED
        s.paused_s = self.now
        s.turn += 1                            # views of a paused session describe turn - 1
        self._event(EventKind.PAUSED, s)
        self._make_evictable(s)                # the engine's default: the prefix cache
        self._ask(Trigger.PAUSE, s)
        self._start_gap(s, turn)

    # -- scheduling -----------------------------------------------------------------
    def _order_waiting(self) -> None:
        if self.waiting_dirty:
            keys = {s.rid: self.decider.waiting_key(self._view(s)) for s in self.waiting}
            self.waiting.sort(key=lambda s: keys[s.rid])
            self.waiting_dirty = False

    def _admit(self, budget: int, reserved: int) -> None:
        """Admit waiting requests in the policy's order while the token budget and GPU
        memory last; `reserved` tokens are already promised to this step's running batch.
        A request whose KV is still coming back is skipped (vLLM's WAITING_FOR_REMOTE_KVS);
        the first one that does not fit stops admission."""
        self._order_waiting()
        i = 0
        while i < len(self.waiting) and len(self.running) < self.cost.max_running:
            s = self.waiting[i]
            target = self._recoverable(s)
            if target > s.g and not s.loading:
                if not self._fits(s, reserved + target - s.g):
                    break
                self._bring_back(s)
                s.loading = True
            if s.loading and s.gpu_ready > self.now:
                i += 1
                continue
            s.loading = False
            if budget <= 0:
                break
            hit = prefix_hit_tokens(min(s.g, s.ctx), s.prompt, self.cfg.block_tokens)
            first = min(s.prompt - hit, budget)
            if not self._fits(s, reserved + first):
                break
            self.waiting.pop(i)
            self._unevict(s)
            if s.g > hit:
                self._gpu_set(s, hit)
            s.pinned, s.ttl_deadline = False, None
            s.state = RUNNING
            s.admitted_s = self.now
            s.prefilled = hit
            s.recompute_upto = max(hit, min(s.hwm, s.prompt))
            self.running.append(s)
            self._event(EventKind.ADMITTED, s, cached=hit)
            budget -= first
            reserved += first

    def _fits(self, s: _Sess, tokens: int) -> bool:
        """Can `tokens` be allocated without evicting `s`'s own cached prefix? If not,
        the policy may free memory (PRESSURE from a waiting request)."""
        avail = self._free() + self.evictable_tokens - (s.g if s.evictable else 0)
        if tokens <= avail:
            return True
        self._ask(Trigger.PRESSURE, s, need_tokens=tokens - avail)
        return tokens <= self._free() + self.evictable_tokens - (s.g if s.evictable else 0)

    def _composition(self) -> tuple[list[_Sess], list[_Sess], int]:
        decoding, prefilling = [], []
        for s in self.running:
            (decoding if s.prefilled >= s.prompt else prefilling).append(s)
        budget = self.cost.max_batched_tokens - len(decoding)
        growth = len(decoding)
        for s in prefilling:
            s.alloc = max(0, min(s.prompt - s.prefilled, budget))
            budget -= s.alloc
            growth += s.alloc
        return decoding, [s for s in prefilling if s.alloc > 0], growth

    def _fit(self) -> tuple[list[_Sess], list[_Sess], int] | None:
        """The step's batch, after resolving memory pressure; None: stall."""
        for _ in range(MAX_PRESSURE_ROUNDS):
            decoding, prefilling, growth = self._composition()
            avail = self._free() + self.evictable_tokens
            if growth <= avail:
                return decoding, prefilling, growth
            pending = self._pending_release()
            if growth <= avail + pending:
                return None                     # swap-outs in flight will make room: stall
            # The first request (in running order) whose allocation fails asks.
            acc, requester = 0, self.running[-1]
            for s in self.running:
                acc += 1 if s.prefilled >= s.prompt else s.alloc
                if acc > avail:
                    requester = s
                    break
            before = (len(self.running), avail)
            self._ask(Trigger.PRESSURE, requester, need_tokens=growth - avail)
            if not self.running and before[0] == 1:
                # The only running request preempted itself: with everything else pinned it
                # would come back and do it again. Release a pin (counted) so work goes on.
                self._break_deadlock()
            if (len(self.running), self._free() + self.evictable_tokens) != before:
                continue
            if self._pending_release() > 0:
                return None
            self.result.fallbacks += 1
            victim = self.decider.fallback.decide(self._snapshot(Trigger.PRESSURE, requester, growth - avail))
            for d in victim.directives:
                self._apply(d)
            if not victim.directives:
                return None
        self.result.pressure_stalls += 1
        return None

    def _pending_release(self) -> int:
        return sum(s.pending_release for s in self.sess if s.pending_release and s.state in (PAUSED, WAITING))

    def _break_deadlock(self) -> bool:
        """Nothing runs, nothing is in flight, and the head of the queue cannot get GPU
        memory (pins hold it all): release pinned paused KV, oldest pause first."""
        head = self.waiting[0] if self.waiting else None
        pinned = sorted((s for s in self.sess if s.state in (PAUSED, WAITING) and s.g and not s.evictable
                         and s is not head and not s.loading),
                        key=lambda s: (s.state != PAUSED, s.paused_s or 0.0))
        if not pinned:
            return False
        self.result.pins_released += 1
        self._make_evictable(pinned[0])
        return True

    # -- time -----------------------------------------------------------------------
    def _account(self, dt: float, running_g: int, running_g_mean: float = 0.0, recompute_share: float = 0.0) -> None:
        """Integrate waste over `dt`: GPU KV held (not evictable) by requests that do
        not compute, and the recomputing share of the step times the running KV."""
        if dt <= 0:
            return
        self._account_host(dt)
        idle = self.gpu_used - self.evictable_tokens - running_g
        self.result.idle_held_gbs += idle * self.bpt * dt / GB
        self.result.recompute_gbs += recompute_share * dt * running_g_mean * self.bpt / GB

    def run(self) -> PolicyResult:
        started = time.perf_counter()
        spins, last_now = 0, -1.0
        while self.active > 0:
            spins = spins + 1 if self.now == last_now else 0
            last_now = self.now
            if spins > MAX_SPINS_AT_ONE_TIME:
                raise RuntimeError(f"{self.policy.name}: the simulation made no progress at t={self.now:.3f} s")
            while self.events and self.events[0][0] <= self.now:
                _, _, kind, s, epoch = heapq.heappop(self.events)
                if kind == "release_waiting":
                    if epoch == s.epoch and s.state == WAITING and s.pending_release:
                        self._gpu_drop_tail(s, s.pending_release)
                        s.pinned = False
                    s.pending_release = 0
                    self.waiting_dirty = True
                    continue
                self._handle(kind, s, epoch)
            _, _, growth = self._composition()
            self._admit(self.cost.max_batched_tokens - growth, growth)
            had_running = bool(self.running)
            batch = self._fit() if had_running else None
            if batch is not None and not self.running and self.waiting:
                continue                        # every running request was preempted: admit again
            if batch is None or (not batch[0] and not batch[1]):
                nxt = self._next_event_s()
                if not math.isfinite(nxt):
                    if self.waiting and self._break_deadlock():
                        continue
                    raise RuntimeError(f"{self.policy.name}: simulation stuck with {len(self.waiting)} waiting, "
                                       f"{len(self.running)} running, {self._free()} free tokens")
                if self.running and batch is None:
                    self.result.stall_s += nxt - self.now
                if not self.running and self.waiting and not any(s.loading for s in self.waiting) \
                        and not self._pending_release() and self._break_deadlock():
                    continue
                self._account(nxt - self.now, sum(s.g for s in self.running))
                self.now = nxt
                continue
            self._advance(*batch)
        r = self.result
        r.makespan_s = self.now
        r.gpu_kv_waste_gbs = r.idle_held_gbs + r.recompute_gbs
        r.bytes_moved = {name: link.moved for name, link in self.links.items()}
        r.policy_errors = self.decider.errors
        r.wall_s = time.perf_counter() - started
        return r

    def _advance(self, decoding: list[_Sess], prefilling: list[_Sess], growth: int) -> None:
        c = self.cost
        tokens = len(decoding) + sum(s.alloc for s in prefilling)
        ctx_sum = sum(s.prefilled + s.decoded for s in decoding)
        a = (c.step_fixed_s + c.token_s * tokens + c.decode_kv_read_s_per_token * ctx_sum
             + c.prefill_attn_s_per_token_pos * sum(s.alloc * (s.prefilled + s.alloc / 2) for s in prefilling))
        if self.prefix:                # every sequence attends over the shared prefix too
            a += self.prefix * (c.decode_kv_read_s_per_token * len(decoding)
                                + c.prefill_attn_s_per_token_pos * sum(s.alloc for s in prefilling))
        b = c.decode_kv_read_s_per_token * len(decoding) + c.prefill_attn_s_per_token_pos * sum(s.alloc ** 2 for s in prefilling)
        k = MAX_STEPS_PER_ADVANCE
        for s in decoding:
            k = min(k, s.out - s.decoded)
        for s in prefilling:
            k = min(k, max(1, (s.prompt - s.prefilled) // s.alloc))
        if growth > 0:
            k = min(k, max(1, (self._free() + self.evictable_tokens) // growth))
        horizon = self._next_event_s() - self.now
        if math.isfinite(horizon):
            k = min(k, max(1, self._steps_within(a, b, horizon)))
        k = max(1, k)
        dt = k * a + b * k * (k - 1) / 2
        if not self._alloc(growth * k):
            k = 1
            dt = a
            self._alloc(growth)
        recomputed = sum(max(0, min(s.recompute_upto, s.prefilled + s.alloc * k) - s.prefilled) for s in prefilling)
        running_g = sum(s.g for s in self.running)
        self._account(dt, running_g, running_g + growth * k / 2, recomputed / max(1, tokens * k))
        self.result.recomputed_tokens += recomputed
        self.result.prefilled_tokens += sum(s.alloc for s in prefilling) * k
        for s in decoding:
            s.decoded += k
            self._gpu_set(s, s.g + k)
        for s in prefilling:
            s.prefilled += s.alloc * k
            self._gpu_set(s, s.g + s.alloc * k)
            if s.prefilled >= s.prompt:
                s.decoded = 1             # the last chunk's step samples the first token
                if not s.first_token:
                    s.first_token = True
                    if s.turn > 0:
                        self.result.ttft_resumed_s.append(self.now + dt - s.arrival_s)
        self.now += dt
        for s in [s for s in self.running if s.prefilled >= s.prompt and s.decoded >= s.out]:
            self._finish_call(s)

    @staticmethod
    def _steps_within(a: float, b: float, horizon: float) -> int:
        if horizon <= 0:
            return 1
        if b <= 0:
            return int(horizon // a)
        # k·a + b·k(k-1)/2 <= horizon
        disc = (a - b / 2) ** 2 + 2 * b * horizon
        return int((-(a - b / 2) + math.sqrt(disc)) / b)


def calibrated_params(policy: str, sessions: list[SimSession], config: SimConfig) -> dict:
    """Constants a baseline fits per engine, fitted to this cost model: InferCept's
    a, c, a', b' and L (see InferceptParams.from_cost), at the sessions' median context."""
    if policy != "infercept":
        return {}
    contexts = sorted(s.mean_context_tokens for s in sessions)
    model = config.model
    return {"params": InferceptParams.from_cost(model.cost, model.bytes_per_token, model.d2h_bytes_per_s,
                                                int(contexts[len(contexts) // 2]), config.block_tokens)}


def strip_shared_prefix(sessions: list[SimSession], prefix_tokens: int) -> list[SimSession]:
    """The sessions' own KV chains: every call's input less the shared prefix (at least one
    token of its own stays: the prefix is at most the first call's prompt - 1)."""
    if prefix_tokens <= 0:
        return sessions
    return [dataclasses.replace(s, turns=tuple(dataclasses.replace(t, input_tokens=max(1, t.input_tokens - prefix_tokens))
                                               for t in s.turns)) for s in sessions]


def simulate(sessions: list[SimSession], policy: "str | KvPolicy", config: SimConfig, **policy_params) -> PolicyResult:
    """Run one policy (a name, or a policy object) over `sessions`; with a shared prefix,
    each session's calls are simulated beyond it and the prefix is held once."""
    sessions = strip_shared_prefix(sessions, config.shared_prefix_tokens)
    calibrated = calibrated_params(policy, sessions, config) if isinstance(policy, str) else {}
    params = {**calibrated, **policy_params}
    return Simulator(sessions, policy, config, **params).run()
