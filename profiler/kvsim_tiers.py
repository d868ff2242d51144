"""Where a simulated request's KV lives and how it moves: GPU blocks and the LRU prefix
cache, the host and SSD copies, and the moves a directive asks for (swap out, bring back,
discard, preempt) over the links. A mixin of `Simulator` (kvsim.py)."""
from __future__ import annotations

from agentcg.engine_protocol import Directive, EventKind, Tier
from agentcg.profiler.kvsim_state import RUNNING, WAITING, _Sess


class KvTiers:
    """Mixin of `Simulator`: GPU, host and SSD KV accounting and the transfers."""

    # -- GPU memory -----------------------------------------------------------------
    def _free(self) -> int:
        return self.cap - self.gpu_used

    def _gpu_set(self, s: _Sess, g: int) -> None:
        delta = g - s.g
        self.gpu_used += delta
        if s.evictable:
            self.evictable_tokens += delta
        s.g = g
        if g == 0:
            self._unevict(s)
            s.pinned, s.ttl_deadline = False, None

    def _gpu_drop_tail(self, s: _Sess, tokens: int) -> None:
        self._gpu_set(s, max(0, s.g - tokens))

    def _make_evictable(self, s: _Sess) -> None:
        s.pinned, s.ttl_deadline = False, None
        if s.g > 0 and not s.evictable:
            s.evictable = True
            self.evictable_tokens += s.g
            self.lru[s.rid] = s
            self.lru.move_to_end(s.rid)

    def _unevict(self, s: _Sess) -> None:
        if s.evictable:
            s.evictable = False
            self.evictable_tokens -= s.g
            self.lru.pop(s.rid, None)

    def _pin(self, s: _Sess, deadline: float | None) -> None:
        self._unevict(s)
        s.pinned, s.ttl_deadline = True, deadline
        if deadline is not None:
            self._push(deadline, "ttl", s)

    def _alloc(self, tokens: int) -> bool:
        """Make `tokens` free, evicting prefix-cache KV LRU, tail blocks first."""
        if tokens <= self._free():
            return True
        if tokens > self._free() + self.evictable_tokens:
            return False
        while tokens > self._free() and self.lru:
            rid, victim = next(iter(self.lru.items()))
            take = min(victim.g, tokens - self._free())
            self._gpu_set(victim, victim.g - take)
        return tokens <= self._free()

    # -- host and SSD ---------------------------------------------------------------
    def _host_capacity_tokens(self) -> int:
        if self.decider.shares_host_memory:
            return self.budget.kv_capacity_bytes(self.sandbox_bytes) // self.bpt
        return self.pool_bytes // self.bpt

    def _set_host(self, s: _Sess, seg: tuple[int, int] | None) -> None:
        old = s.host[1] - s.host[0] if s.host else 0
        new = seg[1] - seg[0] if seg else 0
        self.host_used += new - old + self._tier_holders("host", s.host, seg)
        s.host = seg
        self._note_host()

    def _set_ssd(self, s: _Sess, seg: tuple[int, int] | None) -> None:
        old = s.ssd[1] - s.ssd[0] if s.ssd else 0
        new = seg[1] - seg[0] if seg else 0
        self.ssd_used += new - old + self._tier_holders("ssd", s.ssd, seg)
        s.ssd = seg

    def _note_host(self) -> None:
        kv = self.host_used * self.bpt
        self.result.peak_host_kv_bytes = max(self.result.peak_host_kv_bytes, kv)
        self.result.peak_host_total_bytes = max(self.result.peak_host_total_bytes, kv + self.sandbox_bytes)
        self.result.peak_sandbox_bytes = max(self.result.peak_sandbox_bytes, self.sandbox_bytes)

    def _recoverable(self, s: _Sess) -> int:
        p = s.g
        for _ in range(2):
            for seg in (s.host, s.ssd):
                if seg and seg[0] <= p < seg[1]:
                    p = seg[1]
        return min(p, s.ctx)

    def _drop_all(self, s: _Sess) -> None:
        self._unevict(s)
        self._gpu_set(s, 0)
        self._set_host(s, None)
        self._set_ssd(s, None)
        s.pinned, s.ttl_deadline, s.pending_release = False, None, 0
        s.epoch += 1

    # -- the directives' moves -----------------------------------------------------
    def _discard_gpu(self, s: _Sess, backed: bool) -> int:
        if s.g == 0:
            return 0
        if backed and s.host is not None and s.host_ready > self.now:
            # The host copy is still on its way: the GPU copy goes when it lands.
            s.pending_release = s.g
            self._push(s.host_ready, "release", s, s.epoch)
            return 0
        freed = s.g
        self._unevict(s)
        self._gpu_set(s, 0)
        s.pinned, s.ttl_deadline = False, None
        return freed

    def _swap_out(self, s: _Sess, d: Directive) -> int:
        if s.state == RUNNING or s.g == 0:
            return self._refuse()
        if d.keep_gpu_copy:
            lo = s.host[1] if s.host and s.host[0] == 0 else 0
            seg = (0, s.g)
            moved = max(0, s.g - lo)
        else:
            k = s.g if d.tokens is None else max(0, min(d.tokens, s.g))
            lo = s.g - k
            if s.host and s.host[0] <= s.g and s.host[1] >= lo:
                # The host copy touches or overlaps [lo, g): keep it and move only what it lacks
                # (after a partial swap the host copy starts at g, so the next one merges).
                seg = (min(lo, s.host[0]), max(s.host[1], s.g))
                moved = k - max(0, min(s.g, s.host[1]) - max(lo, s.host[0]))
            else:
                seg = (lo, s.g)
                moved = k
        size = seg[1] - seg[0]
        old = (s.host[1] - s.host[0]) if s.host else 0
        if self.host_used - old + size + self._prefix_extra("host", seg) > self._host_capacity_tokens():
            return self._refuse()
        self._set_host(s, seg)
        s.host_ready = self.links["gpu_to_host"].send(self.now, moved * self.bpt) if moved else max(self.now, s.host_ready)
        if not d.keep_gpu_copy:
            if s.host_ready <= self.now:
                self._gpu_drop_tail(s, k)
                return k
            s.pending_release = k
            self._push(s.host_ready, "release", s, s.epoch)
        return 0

    def _bring_back(self, s: _Sess) -> int:
        """Start moving the recoverable KV back to the GPU; returns tokens allocated, or
        refuses (0) when the GPU has no room."""
        target = self._recoverable(s)
        want = target - s.g
        if want <= 0:
            return 0
        was_evictable = s.evictable
        self._unevict(s)                        # its own cached prefix must not make the room
        if not self._alloc(want):
            if was_evictable:
                self._make_evictable(s)
            self._refuse()
            return 0
        from_host = 0
        if s.host and s.host[0] <= s.g < s.host[1]:
            from_host = min(s.host[1], target) - s.g
        from_ssd = want - from_host
        done = self.now
        if from_host:
            done = max(done, self.links["host_to_gpu"].send(max(self.now, s.host_ready), from_host * self.bpt))
        if from_ssd:
            done = max(done, self.links["ssd_to_gpu"].send(self.now, from_ssd * self.bpt))
        self._unevict(s)
        self._gpu_set(s, target)
        s.pinned = True
        s.gpu_ready = max(s.gpu_ready, done)
        if done > self.now:
            self._push(done, "loaded", s)      # wakes the scheduler; nothing else to do
        return want

    def _preempt(self, s: _Sess, tier: Tier) -> int:
        self.running.remove(s)
        self.result.preemptions += 1
        computed = s.prefilled + s.decoded
        s.ctx = computed
        s.hwm = max(s.hwm, computed)
        # vLLM: num_computed_tokens = 0; what was generated becomes part of the prompt.
        s.prompt, s.out = s.prompt + s.decoded, s.out - s.decoded
        s.prefilled = s.decoded = 0
        s.state = WAITING
        s.preempted_s = self.now
        s.admitted_s = None
        self._event(EventKind.PREEMPTED, s)
        self.waiting.append(s)
        self.waiting_dirty = True
        freed = 0
        held = s.host[1] - s.host[0] if s.host else 0
        if tier is Tier.HOST and s.g \
                and self.host_used - held + s.g + self._prefix_extra("host", (0, s.g)) <= self._host_capacity_tokens():
            s.pinned = True
            self._set_host(s, (0, s.g))
            s.host_ready = self.links["gpu_to_host"].send(self.now, s.g * self.bpt)
            s.pending_release = s.g
            self._push(s.host_ready, "release_waiting", s, s.epoch)
        elif tier is Tier.NONE:
            freed = s.g
            self._drop_all(s)
        else:
            before = self._free() + self.evictable_tokens
            self._make_evictable(s)
            freed = self._free() + self.evictable_tokens - before
        return freed
