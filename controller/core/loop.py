"""The one policy loop: snapshot -> policy.decide -> enforce -> remember what was applied.

The daemon runs `step` on its tick, on a PSI trigger and on a kernel threshold event;
`agentcg replay` runs it on its tick; local tool calls run it around each call. Calls
that want to start wait in `pending` until the policy admits them (or `max_wait_s`
passes, in the policy). Everything applied, and every admission wait, goes into the
event log with its reason; reaction latency is measured from the observation (a
kernel event's timestamp when there is one) to the enforcement write's return.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from agentcg.controller.cgroup import CgroupTree
from agentcg.controller.core.events import EventLog
from agentcg.controller.core.snapshot import Inputs, Key, PendingInput, Readings, Views, build_snapshot
from agentcg.controller.enforce import Applied, Enforcer, Layout
from agentcg.errors import InvalidInput
from agentcg.policies.sandbox import (
    ADMIT, DEFER, FREEZE, KILL, POLICY_NAMES, RELAX, THAW, THROTTLE, Action, Event, GraduatedConfig, Snapshot,
    make_policy,
)

MAX_POLICY_EVENTS = 1024          # events kept for the policy between two steps
LOGGED_KINDS = {"throttle", "freeze", "thaw", "relax", "kill", "protect", "limit"}


@dataclass
class Pending:
    sandbox: str
    call_id: str
    tool: str
    hint_bytes: int | None
    since_s: float
    need_bytes: int | None = None     # what the policy last said it needs
    reason: str | None = None         # why it waits (the last defer)
    deferrals: int = 0


@dataclass
class Step:
    snapshot: Snapshot
    readings: Readings
    applied: list[Applied] = field(default_factory=list)
    admitted: list[tuple[Key, Action, float]] = field(default_factory=list)   # (key, admit, waited_s)
    deferred: list[tuple[Key, Action]] = field(default_factory=list)
    reactions: list[tuple[Applied, float]] = field(default_factory=list)      # (applied, latency_s)
    error: str | None = None


class ControlCore:
    def __init__(self, tree: CgroupTree, policy: str = "agentcg", *, config: GraduatedConfig | None = None,
                 dry_run: bool = False, locate: Any = None, log: EventLog | None = None) -> None:
        self.tree = tree
        self.log = log if log is not None else EventLog()
        self.locate = locate or Layout().locate
        self.frozen: set[Key] = set()
        self.throttle: dict[Key, int] = {}
        self.killed: dict[Key, str | None] = {}      # -> the agent's message
        self.pending: dict[Key, Pending] = {}
        self.peaks: dict[Key, int] = {}
        self.readings: dict[Key, tuple[int, int | None]] = {}   # last reading per call (Inputs.near_budget)
        self.views = Views()          # cold sandboxes' call views between steps (Inputs.call_groups)
        self._events: list[Event] = []
        self._floors: dict[Key, int] = {}
        self.set_policy(policy, dry_run=dry_run, config=config)

    # ---- policy ---------------------------------------------------------------------
    def set_policy(self, name: str, *, dry_run: bool = False, config: GraduatedConfig | None = None) -> None:
        if name not in POLICY_NAMES:
            raise InvalidInput(f"unknown policy {name!r}; choose one of {', '.join(POLICY_NAMES)}")
        self.policy_name = name
        self.config = config or GraduatedConfig()
        self.policy = make_policy(name, self.config)
        self.state = self.policy.initial_state()
        self.enforcer = Enforcer(self.tree, dry_run=dry_run, locate=self.locate)

    @property
    def dry_run(self) -> bool:
        return self.enforcer.dry_run

    # ---- what happened between steps ---------------------------------------------------
    def observe(self, event: Event) -> None:
        if len(self._events) < MAX_POLICY_EVENTS:
            self._events.append(event)

    def crossed(self, sandbox: str, call_id: str | None, now: float, detail: dict[str, Any],
                usage_bytes: int | None = None) -> None:
        """A kernel threshold fired (eBPF RSS threshold, memcg eventfd): the next step may act
        at once, and reads the call at `usage_bytes` at least (what the kernel reported)."""
        self.observe(Event(now, "threshold", sandbox, call_id))
        self.log.append("threshold", sandbox, call_id, detail)
        if call_id is not None and usage_bytes:
            key = (sandbox, call_id)
            self._floors[key] = max(self._floors.get(key, 0), usage_bytes)

    def call_ended(self, sandbox: str, call_id: str, tool: str, peak_bytes: int | None, *, oom_killed: bool,
                   now: float) -> None:
        key = (sandbox, call_id)
        self.frozen.discard(key)
        self.throttle.pop(key, None)
        self.peaks.pop(key, None)
        self.readings.pop(key, None)
        self.views.calls.pop(key, None)
        self.pending.pop(key, None)
        if oom_killed:
            self.observe(Event(now, "oom_kill", sandbox, call_id, tool, peak_bytes))
            self.log.append("oom_kill", sandbox, call_id, {"tool": tool, "peak_bytes": peak_bytes})
        self.observe(Event(now, "call_exit", sandbox, call_id, tool, peak_bytes))

    def forget(self, sandbox: str, call_id: str) -> None:
        key = (sandbox, call_id)
        for table in (self.throttle, self.peaks, self.pending, self.killed, self.readings, self.views.calls):
            table.pop(key, None)
        self.frozen.discard(key)

    # ---- admission ------------------------------------------------------------------
    def add_pending(self, sandbox: str, call_id: str, tool: str, hint_bytes: int | None, now: float) -> None:
        self.pending[(sandbox, call_id)] = Pending(sandbox, call_id, tool, hint_bytes, now)

    def drop_pending(self, sandbox: str, call_id: str) -> Pending | None:
        return self.pending.pop((sandbox, call_id), None)

    # ---- the step -----------------------------------------------------------------------
    def step(self, inputs: Inputs, now: float | None = None, *, time_s: float | None = None,
             observed_s: float | None = None) -> Step:
        """Decide on a fresh snapshot and apply. `observed_s` (time.monotonic() clock, e.g.
        a kernel event's timestamp) is where reaction latency is measured from."""
        now = time.monotonic() if now is None else now
        pending = tuple(PendingInput(p.sandbox, p.call_id, p.tool, p.hint_bytes, p.since_s)
                        for p in self.pending.values())
        events, self._events = tuple(self._events), []
        floors, self._floors = self._floors, {}
        snapshot, readings = build_snapshot(self.tree, inputs, now, time_s=time_s, frozen=self.frozen,
                                            throttle=self.throttle, pending=pending, events=events, peaks=self.peaks,
                                            floors=floors,
                                            cache=self.readings if inputs.near_budget is not None else None,
                                            views=self.views if inputs.near_budget is not None
                                            and inputs.call_groups is not None else None)
        step = Step(snapshot, readings)
        actions, self.state = self.policy.decide(snapshot, self.state)
        observed = now if observed_s is None else observed_s
        for action in actions:
            key = (action.sandbox, action.call_id or "")
            if action.kind == DEFER:
                self._deferred(key, action, now)
                step.deferred.append((key, action))
                continue
            if action.kind == ADMIT and action.value_bytes is None:
                step.admitted.append((key, action, self._admitted(key, action, now)))
                continue
            applied = self.enforcer.apply_one(action)
            step.applied.append(applied)
            if action.kind == ADMIT:
                step.admitted.append((key, action, self._admitted(key, action, now)))
                continue
            self._track(key, applied)
            latency = None
            done_s = applied.time_s + applied.latency_s
            acted_s = applied.write_returned_s if applied.write_returned_s is not None else done_s
            if applied.ok and not applied.dry_run:
                latency = max(0.0, acted_s - observed)
                step.reactions.append((applied, latency))
            if action.kind in LOGGED_KINDS:
                self.log.append(action.kind, action.sandbox, action.call_id, {
                    "reason": action.reason, "applied": applied.detail, "ok": applied.ok,
                    "degraded": applied.degraded, "dry_run": applied.dry_run, "value_bytes": action.value_bytes,
                    "observed_monotonic_s": observed, "applied_monotonic_s": acted_s, "done_monotonic_s": done_s,
                    "write_s": applied.latency_s, "reaction_s": latency})
        return step

    def _deferred(self, key: Key, action: Action, now: float) -> None:
        entry = self.pending.get(key)
        if entry is None:
            return
        entry.need_bytes, entry.reason = action.value_bytes, action.reason
        entry.deferrals += 1
        if entry.deferrals == 1:
            self.log.append("admit_wait", action.sandbox, action.call_id,
                            {"reason": action.reason, "need_bytes": action.value_bytes, "tool": entry.tool})

    def _admitted(self, key: Key, action: Action, now: float) -> float:
        entry = self.pending.pop(key, None)
        waited = now - entry.since_s if entry is not None else 0.0
        if entry is not None and (entry.deferrals or action.value_bytes is not None):
            self.log.append("admit", action.sandbox, action.call_id,
                            {"reason": action.reason, "waited_s": waited, "memory_high_bytes": action.value_bytes})
        return waited

    def _track(self, key: Key, item: Applied) -> None:
        action = item.action
        if not item.ok or item.dry_run or action.call_id is None:
            return
        if action.kind == FREEZE:
            self.frozen.add(key)
        elif action.kind == THAW:
            self.frozen.discard(key)
        elif action.kind == THROTTLE:
            self.throttle[key] = self.throttle.get(key, 0) + 1
        elif action.kind == RELAX:
            self.throttle.pop(key, None)
        elif action.kind == KILL:
            self.killed[key] = action.message
