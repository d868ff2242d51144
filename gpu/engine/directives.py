"""How the reference engine carries out a KV directive (a mixin of engine.Engine): keep,
swap to host, offload to SSD, discard, prefetch and preempt, each refused with a reason
when the request's state or the store cannot take it."""
from __future__ import annotations

from typing import Callable

from agentcg.engine_protocol import Action, Directive, DirectiveResult, EventKind, Tier
from agentcg.gpu.engine.requests import DONE, PENDING, RUNNING, WAITING, _Req
from agentcg.gpu.kvgeometry import KVTierFull
from agentcg.gpu.kvstore import Transfer


class DirectiveHandling:
    def _apply(self, d: Directive) -> DirectiveResult:
        try:
            reason = self._carry_out(d)
        except KVTierFull as exc:
            reason = str(exc)
        result = DirectiveResult(d.request_id, d.action, reason is None, reason)
        if reason is not None:
            self.stats.refused_directives += 1
        self._emit(result)
        r = self.reqs.get(d.request_id)
        if r is not None and r.state not in (PENDING, DONE):
            self._usage(r)
        return result

    def _carry_out(self, d: Directive) -> str | None:
        """Carry out one directive; the reason it was refused, or None."""
        r = self.reqs.get(d.request_id)
        if r is None or r.state in (PENDING, DONE):
            return f"unknown request {d.request_id!r} (not started or finished)"
        a = d.action
        if a is Action.PREEMPT:
            return self._preempt(r, d.tier or Tier.GPU) if r.state == RUNNING else "only a running request can be preempted"
        if r.state == RUNNING:
            return f"{a.value} of a running request; preempt it first"
        if a is Action.KEEP:
            if not self._on_device(r) or r.kv_tokens == 0:
                return "no KV on the device to keep"
            if d.ttl_s is not None and d.ttl_s <= 0:
                self._make_evictable(r)
            else:
                r.pinned, r.evictable_since = True, None
                r.ttl_deadline = None if d.ttl_s is None else self.now() + d.ttl_s
            return None
        if not r.allocated or r.kv_tokens == 0:
            return "the request has no KV"
        if a is Action.SWAP_TO_HOST:
            if d.keep_gpu_copy:
                return "the tiered store keeps one copy per block: keep_gpu_copy is not supported"
            if self.store.placement(r.rid).device_blocks == 0:
                return "no KV on the device"
            self._move(r, self.store.swap_out)
            return None
        if a is Action.OFFLOAD_TO_SSD:
            self._move(r, self.store.offload)
            return None
        if a is Action.DISCARD:
            self._drop(r)
            return None
        if a is Action.PREFETCH:
            return None if self._bring_back(r) else "no room on the device"
        return f"unsupported action {a.value}"

    def _move(self, r: _Req, op: Callable[[str], Transfer]) -> Transfer:
        transfer = op(r.rid)
        self.paged.forget(r.rid)
        r.pinned, r.evictable_since, r.ttl_deadline = False, None, None
        return transfer

    def _bring_back(self, r: _Req) -> bool:
        """Start loading host/SSD KV back to the device (async); False: no room."""
        p = self.store.placement(r.rid)
        need = p.host_blocks + p.ssd_blocks
        if need == 0 or r.loading is not None:
            return True
        if not self._evict(need, keep=r):
            return False
        r.loading = self._move(r, self.store.load if p.ssd_blocks else self.store.swap_in)
        r.pinned = True
        return True

    def _preempt(self, r: _Req, tier: Tier) -> str | None:
        self.running.remove(r)
        self.stats.preemptions += 1
        r.state, r.preempted_s, r.admitted_s = WAITING, self.now(), None
        self.waiting.append(r)
        self._event(EventKind.PREEMPTED, r)
        reason = None
        if r.allocated and tier in (Tier.HOST, Tier.SSD):
            try:
                self._move(r, self.store.swap_out if tier is Tier.HOST else self.store.offload)
                return None
            except KVTierFull as exc:
                reason = f"preempted, but the KV stays in the prefix cache: {exc}"
        if tier is Tier.NONE:
            self._drop(r)
        else:
            self._make_evictable(r)
        return reason
