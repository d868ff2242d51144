"""The `agentcg` sandbox policy: a graduated response to an approaching memory budget.

For each budget (the host's, and each sandbox that has its own) the policy compares the
usage, and the usage projected `lookahead_s` ahead at the current growth rate, with
fractions of the budget:

    >= throttle_at  throttle the offending tool call (memory.high at its usage; cpu.max where
                    the host has no memory.high), one more step per `step_s` while it grows
    >= freeze_at    freeze it (it keeps its memory but stops growing and using CPU)
    >= kill_at      kill tool calls, fewest and lowest priority first, until the projection
                    fits: only when the budget would otherwise be breached (a fast burst past
                    freeze_at whose projection says "breach" is frozen first: a frozen call
                    stops growing, so the projection no longer holds)
    <  relax_below  thaw frozen calls (one per step), then relax throttled ones

A frozen call is killed when the budget would otherwise be breached (above), when it has
been frozen `grace_s` and the budget is still at freeze_at (thawed, it would only be
frozen again), or when it has been frozen twice `grace_s` and the budget is still at
throttle_at (the pressure did not pass). Below freeze_at nothing is in danger while it
stays frozen, so it gets the longer wait: killing loses its work, waiting only delays it.
Thawed when the budget falls below relax_below, or below throttle_at after 2 x grace_s.
The growth rate is measured over at least `rate_interval_s` (steps may come a few ms
apart: on a kernel event, a PSI trigger, an admission; over such a gap a few MiB read as
GiB/s). Victims are tool calls only, never an agent: lowest priority
first, then the largest. High-priority sandboxes get memory.low and a larger cpu.weight
(`protect`). Every action carries its reason; kills carry the agent's message.
Pending calls are admitted or deferred on their declared or observed need (`hints`): a
budget's commitment is its usage plus what its running calls with a known need have yet
to allocate plus what this tick admitted, so two calls never book the same room.
A "threshold" event (the kernel saw a call or sandbox cross a configured fraction) lets
the response act at once, without waiting `step_s` since the last escalation.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

from agentcg.errors import InvalidInput
from agentcg.policies.bounded import touch
from agentcg.policies.sandbox.hints import describe_need, estimate_need, kill_message
from agentcg.policies.sandbox.types import (
    ADMIT, DEFER, FREEZE, KILL, PRIORITY_CPU_WEIGHT, PRIORITY_RANK, PROTECT, RELAX, THAW, THROTTLE, Action,
    CallView, SandboxView, Snapshot,
)
from agentcg.units import format_bytes

CallKey = tuple[str, str]          # (sandbox, call_id)
HOST = "host"


@dataclass(frozen=True)
class GraduatedConfig:
    throttle_at: float = 0.80      # fractions of the budget
    freeze_at: float = 0.90
    kill_at: float = 0.97
    relax_below: float = 0.75
    grace_s: float = 5.0           # how long a call may stay frozen while pressure persists
    step_s: float = 0.2            # least time between two escalations in one budget
    lookahead_s: float = 0.3       # growth projection horizon
    rate_interval_s: float = 0.03  # the shortest interval the growth rate is measured over (< a 50 ms tick)
    throttle_steps: tuple[float, ...] = (1.0, 0.95, 0.9)       # memory.high = usage * step
    throttle_cpu_cores: tuple[float, ...] = (0.5, 0.2, 0.05)   # cpu.max fallback per step
    protect_fraction: float = 0.5  # memory.low of a high-priority sandbox, of its budget
    min_victim_bytes: int = 8 << 20  # smaller calls free too little to be worth killing
    min_growth_bytes: int = 1 << 20  # growth since the last snapshot that makes a call an offender
    admit_at: float = 0.90         # a hinted call starts if usage + need fits below this
    hint_margin: float = 0.25      # its initial memory.high: need * (1 + margin)
    max_wait_s: float = 30.0       # a deferred call starts anyway after this long
    peak_history: int = 8          # observed peaks kept per (sandbox, tool)

    def __post_init__(self) -> None:
        if not 0 < self.relax_below < self.throttle_at <= self.freeze_at <= self.kill_at <= 1:
            raise InvalidInput(
                "policy thresholds must satisfy 0 < relax_below < throttle_at <= freeze_at <= kill_at <= 1 "
                f"(fractions of the budget), got relax_below={self.relax_below}, throttle_at={self.throttle_at}, "
                f"freeze_at={self.freeze_at}, kill_at={self.kill_at}"
            )
        for name in ("grace_s", "step_s", "max_wait_s"):
            if not getattr(self, name) > 0:
                raise InvalidInput(f"policy {name} must be a positive number of seconds, got {getattr(self, name)!r}")
        if not self.rate_interval_s >= 0:
            raise InvalidInput(f"policy rate_interval_s must be >= 0 seconds, got {self.rate_interval_s!r}")
        if self.lookahead_s < 0 or self.hint_margin < 0 or not 0 <= self.protect_fraction <= 1:
            raise InvalidInput("policy lookahead_s and hint_margin must be >= 0, protect_fraction in 0..1")
        if not self.throttle_steps or len(self.throttle_steps) != len(self.throttle_cpu_cores):
            raise InvalidInput("policy throttle_steps and throttle_cpu_cores need the same, non-zero length")
        if self.peak_history < 1:
            raise InvalidInput(f"policy peak_history must be >= 1, got {self.peak_history}")


@dataclass(frozen=True)
class GraduatedState:
    protected: frozenset[str] = frozenset()
    throttled: dict[CallKey, int] = field(default_factory=dict)        # level, 1-based
    frozen_since: dict[CallKey, float] = field(default_factory=dict)
    killed: frozenset[CallKey] = frozenset()
    peaks: dict[tuple[str, str], tuple[int, ...]] = field(default_factory=dict)
    last_usage: dict[str, tuple[float, int]] = field(default_factory=dict)  # budget -> (time, bytes)
    last_step: dict[str, float] = field(default_factory=dict)               # budget -> time
    last_call_usage: dict[CallKey, int] = field(default_factory=dict)
    last_rate: dict[str, float] = field(default_factory=dict)                # budget -> bytes/s


@dataclass(frozen=True)
class _Budget:
    name: str                      # "host" or a sandbox name
    limit_name: str
    budget_bytes: int
    usage_bytes: int
    calls: tuple[tuple[SandboxView, CallView], ...]


class GraduatedPolicy:
    name = "agentcg"

    def __init__(self, config: GraduatedConfig | None = None) -> None:
        self.config = config or GraduatedConfig()

    def initial_state(self) -> GraduatedState:
        return GraduatedState()

    def decide(self, snapshot: Snapshot, state: GraduatedState) -> tuple[list[Action], GraduatedState]:
        run = _Tick(self.config, snapshot, state)
        run.learn()
        run.protect()
        for budget in _budgets(snapshot):
            run.respond(budget)
        run.admit()
        return run.actions, run.next_state()


def _budgets(snapshot: Snapshot) -> Iterable[_Budget]:
    if snapshot.host_budget_bytes:
        calls = tuple((sb, call) for sb in snapshot.sandboxes for call in sb.calls)
        yield _Budget(HOST, "the host memory budget", snapshot.host_budget_bytes, snapshot.host_usage_bytes, calls)
    for sb in snapshot.sandboxes:
        if sb.budget_bytes:
            yield _Budget(sb.name, f"sandbox {sb.name}'s memory budget", sb.budget_bytes, sb.usage_bytes,
                          tuple((sb, call) for call in sb.calls))


class _Tick:
    """One decision: mutable working copies of the state, turned back into a frozen one."""

    def __init__(self, config: GraduatedConfig, snapshot: Snapshot, state: GraduatedState) -> None:
        self.c, self.snap, self.now = config, snapshot, snapshot.time_s
        live = {(sb.name, call.call_id) for sb in snapshot.sandboxes for call in sb.calls}
        self.throttled = {k: v for k, v in state.throttled.items() if k in live}
        self.frozen_since = {k: v for k, v in state.frozen_since.items() if k in live}
        self.killed = {k for k in state.killed if k in live}
        self.protected = set(state.protected) & {sb.name for sb in snapshot.sandboxes}
        self.peaks = dict(state.peaks)
        self.last_usage = dict(state.last_usage)
        self.last_step = dict(state.last_step)
        self.last_call_usage = {k: v for k, v in state.last_call_usage.items() if k in live}
        self.last_rate = dict(state.last_rate)
        self.acted: set[CallKey] = set()
        self.actions: list[Action] = []

    def next_state(self) -> GraduatedState:
        usage = {(sb.name, call.call_id): call.usage_bytes for sb in self.snap.sandboxes for call in sb.calls}
        return GraduatedState(frozenset(self.protected), self.throttled, self.frozen_since, frozenset(self.killed),
                              self.peaks, self.last_usage, self.last_step, usage, self.last_rate)

    def add(self, action: Action) -> None:
        self.actions.append(action)
        if action.call_id is not None:
            self.acted.add((action.sandbox, action.call_id))

    # ---- learning and protection ---------------------------------------------------
    def learn(self) -> None:
        for event in self.snap.events:
            if event.kind == "call_exit" and event.tool and event.peak_bytes:
                key = (event.sandbox, event.tool)
                touch(self.peaks, key, (self.peaks.get(key, ()) + (event.peak_bytes,))[-self.c.peak_history:])

    def protect(self) -> None:
        for sb in self.snap.sandboxes:
            if sb.name in self.protected:
                continue
            self.protected.add(sb.name)
            budget = sb.budget_bytes or self.snap.host_budget_bytes
            low = None
            if sb.priority == "high" and budget:
                low = int(budget * self.c.protect_fraction)
            elif sb.priority == "low":
                low = 0   # v1 soft limit 0: reclaimed first under global pressure
            reason = (f"priority {sb.priority}: cpu.weight {PRIORITY_CPU_WEIGHT[sb.priority]}"
                      + (f", memory.low {format_bytes(low)}" if low is not None else ""))
            self.add(Action(PROTECT, sb.name, None, low, reason, cpu_weight=PRIORITY_CPU_WEIGHT[sb.priority]))

    # ---- the graduated response -------------------------------------------------------
    def respond(self, b: _Budget) -> None:
        c = self.c
        # a call killed earlier may still hold its memory while it exits: it is already gone
        # for this decision, or one kill would be followed by more for the same excess
        dying = sum(call.usage_bytes for sb, call in b.calls if (sb.name, call.call_id) in self.killed)
        if dying:
            b = _Budget(b.name, b.limit_name, b.budget_bytes, max(0, b.usage_bytes - dying), b.calls)
        used = b.usage_bytes / b.budget_bytes
        rate = self.last_rate.get(b.name, 0.0)
        if b.name not in self.last_usage:
            touch(self.last_usage, b.name, (self.now, b.usage_bytes))
        else:
            t0, u0 = self.last_usage[b.name]
            if self.now - t0 >= max(c.rate_interval_s, 1e-9):
                rate = (b.usage_bytes - u0) / (self.now - t0)
                touch(self.last_usage, b.name, (self.now, b.usage_bytes))
                touch(self.last_rate, b.name, rate)
        projected_bytes = b.usage_bytes + max(0.0, rate) * c.lookahead_s
        projected = projected_bytes / b.budget_bytes
        state = f"{b.limit_name} {format_bytes(b.budget_bytes)} at {used:.0%}"
        if rate > 0:
            state += f", growing {format_bytes(rate)}/s"

        offenders = self.offenders(b)
        freezable = [(sb, call) for sb, call in offenders
                     if not call.frozen and (sb.name, call.call_id) not in self.frozen_since]
        if used >= c.kill_at or (used >= c.freeze_at and projected >= c.kill_at and not freezable):
            self.kill_until_fits(b, projected_bytes, state, used)
            return
        self.expire(b, used, state)
        may_step = (self.now - self.last_step.get(b.name, float("-inf")) >= c.step_s
                    or self.crossed(b))
        if max(used, projected) >= c.freeze_at and may_step:
            victim = freezable[0] if freezable else None
            if victim is not None:
                sb, call = victim
                self.frozen_since[(sb.name, call.call_id)] = self.now
                touch(self.last_step, b.name, self.now)
                self.add(Action(FREEZE, sb.name, call.call_id, None,
                                f"{state}: freeze {call.tool} call (priority {sb.priority}) growing at "
                                f"{format_bytes(self.growth(sb, call))} per tick, holding {format_bytes(call.usage_bytes)}"))
                return
        if max(used, projected) >= c.throttle_at and may_step:
            top = len(c.throttle_steps)
            victim = next(((sb, call) for sb, call in offenders
                           if (sb.name, call.call_id) not in self.frozen_since and not call.frozen
                           and self.throttled.get((sb.name, call.call_id), 0) < top), None)
            if victim is not None:
                sb, call = victim
                key = (sb.name, call.call_id)
                level = self.throttled.get(key, 0) + 1
                self.throttled[key] = level
                touch(self.last_step, b.name, self.now)
                high = int(call.usage_bytes * c.throttle_steps[level - 1])
                self.add(Action(THROTTLE, sb.name, call.call_id, high,
                                f"{state}: throttle {call.tool} call (priority {sb.priority}), growing at "
                                f"{format_bytes(self.growth(sb, call))} per tick, to step {level}: memory.high "
                                f"{format_bytes(high)}", cpu_max_cores=c.throttle_cpu_cores[level - 1]))
                return
        if used < c.relax_below:
            self.relax(b, state)

    def crossed(self, b: _Budget) -> bool:
        """A kernel threshold fired in this budget since the last snapshot."""
        names = {sb.name for sb, _ in b.calls} | ({b.name} if b.name != HOST else set())
        return any(e.kind == "threshold" and (b.name == HOST or e.sandbox in names) for e in self.snap.events)

    def grew(self, sb: SandboxView, call: CallView) -> bool:
        """Growing enough to act on; a call (or a sandbox) the kernel just saw cross a
        threshold upwards counts with any growth: the crossing is the evidence."""
        growth = self.growth(sb, call)
        if growth >= self.c.min_growth_bytes:
            return True
        return growth > 0 and any(e.kind == "threshold" and e.sandbox == sb.name and e.call_id in (None, call.call_id)
                                  for e in self.snap.events) or any(
            e.kind == "threshold" and e.sandbox == sb.name and e.call_id == call.call_id for e in self.snap.events)

    def growth(self, sb: SandboxView, call: CallView) -> int:
        return call.usage_bytes - self.last_call_usage.get((sb.name, call.call_id), 0)   # new: grew from 0

    def shielded(self, b: _Budget) -> int | None:
        """The priority rank spared throttling and freezing: the highest present, when
        lower ones are there to take from (priority isolation)."""
        ranks = {PRIORITY_RANK[sb.priority] for sb, _ in b.calls}
        ranks |= {PRIORITY_RANK[sb.priority] for sb in self.snap.sandboxes if b.name in (HOST, sb.name)}
        return max(ranks) if len(ranks) > 1 else None

    def offenders(self, b: _Budget) -> list[tuple[SandboxView, CallView]]:
        """Growing calls that may be throttled or frozen: lowest priority first, then fastest."""
        shielded = self.shielded(b)
        found = [(sb, call) for sb, call in b.calls
                 if self.grew(sb, call) and PRIORITY_RANK[sb.priority] != shielded
                 and (sb.name, call.call_id) not in self.killed and (sb.name, call.call_id) not in self.acted]
        found.sort(key=lambda pair: (PRIORITY_RANK[pair[0].priority], -self.growth(*pair)))
        return found

    def kill_until_fits(self, b: _Budget, projected_bytes: float, state: str, used: float) -> None:
        """Lowest priority first, frozen before running, largest first; the shielded rank
        last, and only when the usage itself is at kill_at: a breach that is only projected
        (from the growth rate) does not cost a protected call, since the call growing may be
        that one finishing its burst (a replayed pytest killed 25 MiB short of its peak)."""
        excess = projected_bytes - self.c.freeze_at * b.budget_bytes
        shielded = self.shielded(b) if used < self.c.kill_at else None
        victims = [(sb, call) for sb, call in b.calls
                   if (sb.name, call.call_id) not in self.killed and (sb.name, call.call_id) not in self.acted
                   and call.usage_bytes >= self.c.min_victim_bytes and PRIORITY_RANK[sb.priority] != shielded]
        victims.sort(key=lambda pair: (PRIORITY_RANK[pair[0].priority],
                                       (pair[0].name, pair[1].call_id) not in self.frozen_since,
                                       -pair[1].usage_bytes))
        for sb, call in victims:
            if excess <= 0:
                return
            self.kill(b, sb, call, f"{state}: the budget would be breached", state)
            excess -= call.usage_bytes

    def expire(self, b: _Budget, used: float, state: str) -> None:
        """A call frozen for the grace period is killed if the budget is still at the freeze
        threshold; one frozen twice the grace period if it is still at the throttle
        threshold; else it is thawed to try again (it is frozen again if it grows)."""
        for sb, call in b.calls:
            key = (sb.name, call.call_id)
            since = self.frozen_since.get(key)
            if since is None or key in self.acted or self.now - since < self.c.grace_s:
                continue
            waited = self.now - since
            if used >= self.c.freeze_at or (used >= self.c.throttle_at and waited >= 2 * self.c.grace_s):
                level = "freeze" if used >= self.c.freeze_at else "throttle"
                why = (f"frozen {waited:.1f} s (grace {self.c.grace_s:g} s) and the pressure did not pass "
                       f"(still at the {level} threshold)")
                victim = self.largest_frozen(b) or (sb, call)
                if victim[1].call_id != call.call_id or victim[0].name != sb.name:
                    why = (f"{call.tool} call {call.call_id} of {sb.name} {why}; the frozen call that frees "
                           "the most goes first")
                self.kill(b, victim[0], victim[1], f"{state}: {why}", state)
                return
            if waited >= 2 * self.c.grace_s:
                del self.frozen_since[key]
                self.add(Action(THAW, sb.name, call.call_id, None,
                                f"{state}: pressure eased below the throttle threshold; thaw {call.tool} call "
                                f"after {self.now - since:.1f} s frozen"))
                return

    def largest_frozen(self, b: _Budget) -> tuple[SandboxView, CallView] | None:
        """The frozen call whose kill frees the most: lowest priority first, then largest.
        Killing a small frozen call because its wait ran out first would leave the
        pressure where it was and cost a second kill."""
        frozen = [(sb, call) for sb, call in b.calls if (sb.name, call.call_id) in self.frozen_since
                  and (sb.name, call.call_id) not in self.acted and call.usage_bytes >= self.c.min_victim_bytes]
        frozen.sort(key=lambda pair: (PRIORITY_RANK[pair[0].priority], -pair[1].usage_bytes))
        return frozen[0] if frozen else None

    def kill(self, b: _Budget, sb: SandboxView, call: CallView, reason: str, state: str) -> None:
        key = (sb.name, call.call_id)
        self.killed.add(key)
        self.frozen_since.pop(key, None)
        self.throttled.pop(key, None)
        message = kill_message(call_id=call.call_id, tool=call.tool, sandbox=sb.name,
                               reason=reason[len(state) + 2:] if reason.startswith(state) else reason,
                               limit_name=b.limit_name, limit_bytes=b.budget_bytes, usage_bytes=b.usage_bytes,
                               call_usage_bytes=call.usage_bytes, call_peak_bytes=max(call.peak_bytes, call.usage_bytes))
        self.add(Action(KILL, sb.name, call.call_id, call.usage_bytes,
                        f"{reason}; kill {call.tool} call holding {format_bytes(call.usage_bytes)} "
                        f"(priority {sb.priority})", message=message))

    def relax(self, b: _Budget, state: str) -> None:
        frozen = [(sb, call) for sb, call in b.calls if (sb.name, call.call_id) in self.frozen_since
                  and (sb.name, call.call_id) not in self.acted]
        if frozen:
            frozen.sort(key=lambda p: (-PRIORITY_RANK[p[0].priority], self.frozen_since[(p[0].name, p[1].call_id)]))
            sb, call = frozen[0]
            since = self.frozen_since.pop((sb.name, call.call_id))
            self.add(Action(THAW, sb.name, call.call_id, None,
                            f"{state}: pressure passed, thaw {call.tool} call after {self.now - since:.1f} s frozen"))
            return
        for sb, call in b.calls:
            key = (sb.name, call.call_id)
            if key in self.throttled and key not in self.acted:
                level = self.throttled.pop(key)
                self.add(Action(RELAX, sb.name, call.call_id, None,
                                f"{state}: pressure passed, relax {call.tool} call from throttle step {level}"))

    # ---- admission --------------------------------------------------------------------
    def need_of(self, sandbox: str, tool: str, hint: int | None) -> int | None:
        return estimate_need(hint, self.peaks.get((sandbox, tool), ()))

    def committed(self) -> tuple[int, dict[str, int]]:
        """What running calls with a known need have yet to allocate (host, per sandbox):
        a call admitted a tick ago holds little yet, but its room is taken."""
        host, per = 0, {}
        for sb in self.snap.sandboxes:
            for call in sb.calls:
                need = self.need_of(sb.name, call.tool, call.hint_bytes)
                if need is not None and (sb.name, call.call_id) not in self.killed:
                    rest = max(0, need - max(call.usage_bytes, call.peak_bytes))
                    host += rest
                    per[sb.name] = per.get(sb.name, 0) + rest
        return host, per

    def admit(self) -> None:
        c = self.c
        pending = [(sb, p) for sb in self.snap.sandboxes for p in sb.pending]
        if not pending:
            return                  # nothing to admit: the commitments (a pass over every call) are not needed
        host_reserved, reserved = self.committed()
        pending.sort(key=lambda pair: (-PRIORITY_RANK[pair[0].priority], -pair[1].waited_s))
        for sb, call in pending:
            observed = self.peaks.get((sb.name, call.tool), ())
            need = estimate_need(call.hint_bytes, observed)
            why = describe_need(call.hint_bytes, observed)
            if need is None:
                self.add(Action(ADMIT, sb.name, call.call_id, None, f"start without a limit: {why}"))
                continue
            high = int(need * (1 + c.hint_margin))
            budgets = [(HOST, self.snap.host_budget_bytes, self.snap.host_usage_bytes + host_reserved),
                       (sb.name, sb.budget_bytes, sb.usage_bytes + reserved.get(sb.name, 0))]
            short = [(name, limit, used) for name, limit, used in budgets
                     if limit and used + need > c.admit_at * limit]
            start = None
            if not short:
                start = f"needs {format_bytes(need)} ({why}) and it fits; memory.high {format_bytes(high)}"
            elif sb.priority == "high":
                start = (f"needs {format_bytes(need)} ({why}); high priority starts now and lower-priority "
                         f"calls make room; memory.high {format_bytes(high)}")
            elif call.waited_s >= c.max_wait_s:
                start = (f"needs {format_bytes(need)} ({why}); waited {call.waited_s:.1f} s, the most "
                         f"allowed, so it starts; memory.high {format_bytes(high)}")
            if start is not None:
                host_reserved += need
                reserved[sb.name] = reserved.get(sb.name, 0) + need
                self.add(Action(ADMIT, sb.name, call.call_id, high, start))
            else:
                name, limit, used = short[0]
                where = "the host" if name == HOST else f"sandbox {name}"
                self.add(Action(DEFER, sb.name, call.call_id, need,
                                f"needs {format_bytes(need)} ({why}) but {where} has {format_bytes(used)} of "
                                f"{format_bytes(limit)} in use or promised; waits for room"))
