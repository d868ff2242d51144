"""The simulator's side of the decision harness: each live request's view, the snapshot
a policy decides on, asking it, and carrying out (or refusing) its directives. A mixin of
`Simulator` (kvsim.py)."""
from __future__ import annotations

from agentcg.engine_protocol import Action, Directive, Tier
from agentcg.policies.kv.harness import build_snapshot, is_decoding
from agentcg.policies.kv.types import KvSnapshot, RequestView, State, Trigger
from agentcg.profiler.kvsim_state import DONE, PAUSED, PENDING, RUNNING, WAITING, _Sess

_new_view = tuple.__new__


class PolicyBridge:
    """Mixin of `Simulator`: views, snapshots, decisions and directives."""

    def _ask_host_pressure(self, need_bytes: int) -> None:
        self._ask(Trigger.HOST_PRESSURE, None, need_bytes=need_bytes)

    # -- policy ---------------------------------------------------------------------
    def _view(self, s: _Sess) -> RequestView:
        now = self.now
        turns = s.spec.turns
        st = s.state
        if st == PAUSED:
            state, last, prev = State.PAUSED, s.turn - 1, turns[s.turn - 1]
            remaining = max(0.0, s.gap_start_s + prev.tool_s - now)     # a repeated call started later
            tool, ctx, decoding = prev.tool, s.ctx, False
        else:
            running = st == RUNNING
            state = State.RUNNING if running else State.WAITING
            last, remaining, tool = s.turn, None, None
            ctx = s.prefilled + s.decoded if running else s.ctx
            decoding = running and is_decoding(s.prefilled, s.prompt)
        host, ssd = s.host, s.ssd
        rid = s.spec.session_id
        # tuple.__new__: this runs for every live request on every decision (the hot path).
        return _new_view(RequestView, (
            rid, rid, s.spec.sandbox, state, last, ctx, s.g,
            host[1] - host[0] if host else 0, ssd[1] - ssd[0] if ssd else 0,
            s.pinned and not s.evictable, host is not None and s.host_ready > now,
            s.arrival_s, s.start_s, s.admitted_s, s.paused_s, s.preempted_s, tool,
            last == len(turns) - 1, remaining, s.index, decoding))

    def _snapshot(self, trigger: Trigger, subject: _Sess | None, need_tokens: int = 0, need_bytes: int = 0) -> KvSnapshot:
        live = [s for s in self.sess if s.state in (RUNNING, WAITING, PAUSED)]
        return build_snapshot(
            now_s=self.now, trigger=trigger, subject=subject.rid if subject else None,
            views=[self._view(s) for s in live], bytes_per_token=self.bpt, gpu_capacity_tokens=self.cap,
            gpu_free_tokens=self._free(), gpu_evictable_tokens=self.evictable_tokens,
            host_capacity_bytes=self._host_capacity_tokens() * self.bpt, host_used_bytes=self.host_used * self.bpt,
            ssd_capacity_bytes=self.cfg.ssd_bytes, ssd_used_bytes=self.ssd_used * self.bpt,
            bandwidths=self.bandwidths, cost=self.cost, need_tokens=need_tokens, need_bytes=need_bytes)

    def _ask(self, trigger: Trigger, subject: _Sess | None, need_tokens: int = 0, need_bytes: int = 0) -> int:
        decision = self.decider.decide(self._snapshot(trigger, subject, need_tokens, need_bytes))
        wake = self.decider.wake_at_s
        if decision.wake_at_s is not None and wake is not None and wake != self.wake_at:
            self.wake_at = wake
            self._push(wake, "wake", None)
        return sum(self._apply(d) for d in decision.directives)

    def _refuse(self) -> int:
        self.result.refused_directives += 1
        return 0

    def _apply(self, d: Directive) -> int:
        """Carry out one directive; returns the GPU tokens it freed at once."""
        s = self.by_id.get(d.request_id) if isinstance(d, Directive) else None
        if s is None or s.state in (PENDING, DONE):
            self.result.unknown_directives += 1
            return 0
        a = d.action
        if a is Action.KEEP:
            if s.state == RUNNING or s.g == 0:
                return self._refuse()
            if d.ttl_s is not None and d.ttl_s <= 0:
                before = self._free() + self.evictable_tokens
                self._make_evictable(s)
                return self._free() + self.evictable_tokens - before
            self._pin(s, None if d.ttl_s is None else self.now + d.ttl_s)
            return 0
        if a is Action.SWAP_TO_HOST:
            return self._swap_out(s, d)
        if a is Action.OFFLOAD_TO_SSD:
            if s.host is None:
                return self._refuse()
            size = s.host[1] - s.host[0]
            old = (s.ssd[1] - s.ssd[0]) if s.ssd else 0
            if (self.ssd_used - old + size + self._prefix_extra("ssd", s.host)) * self.bpt > self.cfg.ssd_bytes:
                return self._refuse()
            self._set_ssd(s, s.host)
            done = self.links["host_to_ssd"].send(max(self.now, s.host_ready), size * self.bpt)
            self._push(done, "ssd_done", s, s.epoch)
            return 0
        if a is Action.DISCARD:
            if s.state == RUNNING and d.tier in (None, Tier.GPU):
                return self._refuse()
            if d.tier in (None, Tier.GPU):
                freed = self._discard_gpu(s, backed=d.tier is Tier.GPU)
                if d.tier is None:
                    self._set_host(s, None)
                    self._set_ssd(s, None)
                    s.epoch += 1
                return freed
            if d.tier is Tier.HOST:
                self._set_host(s, None)
            elif d.tier is Tier.SSD:
                self._set_ssd(s, None)
            return 0
        if a is Action.PREFETCH:
            if s.state != PAUSED:
                return self._refuse()
            return -self._bring_back(s)
        if a is Action.PREEMPT:
            if s.state != RUNNING:
                return self._refuse()
            return self._preempt(s, d.tier or Tier.GPU)
        return self._refuse()
