"""Host memory in the KV simulator: the sandboxes' recorded memory and the host KV pool
share one host budget, the same accounting for every policy.

- Each session's sandbox follows its recorded curve (`SimTurn.memory`: steps at offsets
  from the gap's start, replayed from the simulated pause; `call_bytes` during the next
  LLM call, when lower). It exists from the session's first call to its last.
- A policy that does not share host memory (`shares_host_memory` False) has a fixed host
  pool (`SimConfig.host_kv_static_bytes`), allocated at start: the sandboxes get the
  budget minus the whole pool. A policy without a host tier (`host_tier` False: vllm-v1)
  reserves no pool.
- A policy that shares (agentcg) gets what the sandboxes leave: when a sandbox grows
  into the KV, the policy is asked (HOST_PRESSURE, the daemon's path); what it does not
  free is spilled by force (host copies dropped, counted in `forced_spill_bytes`). KV on
  its way to SSD counts as freed (the sandbox waits, throttled, for the write).
- A sandbox that grows past what it may have is OOM-killed (counted): its tool call
  starts again from the beginning of the gap, memory at the gap's start. After
  `max_kills_per_call` kills the call is given up (counted in `failed_calls`) and the
  agent goes on; its memory is then tolerated over the limit.
- The shared prefix (`shared_prefix_tokens`) is stored once per tier: on the GPU always
  (resident, hot), on the host / SSD once while any session has a copy there.
"""
from __future__ import annotations

GIB = float(1 << 30)


class HostMemory:
    """Mixin of `Simulator`: the sandboxes' memory, OOM kills and the shared prefix."""

    # -- the shared prefix, once per tier --------------------------------------------
    def _tier_holders(self, name: str, old, new) -> int:
        """Tokens the shared prefix adds (+P), frees (-P) or neither when a session's
        copy on tier `name` changes from `old` to `new` (a copy from 0 includes it)."""
        p = self.prefix
        if not p:
            return 0
        was, now = bool(old and old[0] == 0), bool(new and new[0] == 0)
        if was == now:
            return 0
        count = self.prefix_holders[name] + (1 if now else -1)
        self.prefix_holders[name] = count
        if now and count == 1:
            return p
        if not now and count == 0:
            return -p
        return 0

    def _prefix_extra(self, name: str, seg) -> int:
        """Tokens a new copy `seg` on tier `name` costs for the shared prefix."""
        return self.prefix if self.prefix and seg and seg[0] == 0 and not self.prefix_holders[name] else 0

    # -- sandboxes ----------------------------------------------------------------------
    def _sandbox_limit_bytes(self) -> int:
        """What the sandboxes together may use before one is OOM-killed."""
        room = self.cfg.host_memory_bytes - self.cfg.host_reserve_bytes
        if not self.decider.shares_host_memory:
            room -= self.pool_bytes
        return room

    def _start_gap(self, s, turn) -> None:
        """A tool call (re)starts: memory along the turn's curve, the next call after the gap."""
        s.gap_epoch += 1
        steps = turn.memory or (((0.0, turn.sandbox_bytes),) if turn.sandbox_bytes else ())
        s.mem_steps, s.mem_idx, s.gap_start_s = steps, 0, self.now
        if self.cfg.sandbox_memory:
            self._mem_step(s, initial=True)
        self._push(self.now + turn.tool_s, "arrive", s, s.gap_epoch)

    def _mem_step(self, s, initial: bool = False) -> None:
        """Apply the sandbox's due memory steps; schedule the next one."""
        steps = s.mem_steps
        while s.mem_idx < len(steps) and (initial or s.gap_start_s + steps[s.mem_idx][0] <= self.now):
            offset, nbytes = steps[s.mem_idx]
            if initial and offset > 0:
                break
            s.mem_idx += 1
            if not self._set_sandbox(s, nbytes, can_kill=not initial):
                return                                  # killed: the gap started again
        if s.mem_idx < len(steps):
            self._push(s.gap_start_s + steps[s.mem_idx][0], "mem", s, s.gap_epoch)

    def _set_sandbox(self, s, nbytes: int, can_kill: bool = False) -> bool:
        """Set `s`'s sandbox memory; False when the sandbox was OOM-killed instead."""
        delta = nbytes - s.sandbox
        if delta > 0 and can_kill and not s.give_up \
                and self.sandbox_bytes + delta > self._sandbox_limit_bytes() and not self._oom_kill(s):
            return False
        s.sandbox = nbytes
        self.sandbox_bytes += delta
        self._note_host()
        if delta > 0 and self.decider.shares_host_memory:
            self._host_pressure()
        return True

    def _oom_kill(self, s) -> bool:
        """Kill the sandbox's tool call and start it again (False); True once the call is
        given up, its memory then allowed."""
        r = self.result
        r.sandbox_oom_kills += 1
        s.kills += 1
        if s.kills > self.cfg.max_kills_per_call:
            r.failed_calls += 1
            s.give_up = True                 # the agent sees the call fail and goes on
            return True
        turn = s.spec.turns[s.turn - 1]
        self._start_gap(s, turn)             # the tool call is repeated from its start
        return False

    def _host_pressure(self) -> None:
        """A sharing policy's pool shrinks to what the sandboxes leave."""
        over = self._host_over_tokens()
        if over <= 0:
            return
        self._ask_host_pressure(over * self.bpt)
        over = self._host_over_tokens()
        for other in sorted(self.sess, key=lambda o: (o.host is None, o.state == "waiting", -(o.paused_s or 0.0))):
            if over <= 0 or other.host is None:
                break
            if other.ssd is not None and other.ssd == other.host:
                continue                     # already on its way to SSD
            size = other.host[1] - other.host[0]
            self.result.forced_spill_bytes += size * self.bpt
            self.result.forced_spills += 1
            self._set_host(other, None)
            over = self._host_over_tokens()

    def _host_over_tokens(self) -> int:
        leaving = sum(o.host[1] - o.host[0] for o in self.sess
                      if o.host is not None and o.ssd is not None and o.ssd == o.host)
        return self.host_used - leaving - self._host_capacity_tokens()

    def _account_host(self, dt: float) -> None:
        if dt <= 0:
            return
        used = self.sandbox_bytes + self.host_used * self.bpt
        self.result.host_idle_gibs += max(0, self.cfg.host_memory_bytes - used) * dt / GIB
