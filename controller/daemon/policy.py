"""The daemon's policy tick: read the cgroups into a `Snapshot`, ask the sandbox policy
(agentcg.policies.sandbox) for actions, apply them with the shared `Enforcer`.

The tick runs every `[policy] tick_s`, and at once when a PSI trigger fires or eBPF
reports something that needs a decision. Reaction latency is measured from that
observation to the moment the action's cgroup write returned.
"""
from __future__ import annotations

import time
from typing import TYPE_CHECKING

from agentcg.controller.enforce import Applied, Enforcer, Layout
from agentcg.errors import AgentcgError, InvalidInput
from agentcg.policies.sandbox import (
    FREEZE, KILL, POLICY_NAMES, RELAX, THAW, THROTTLE, CallView, Event, SandboxView, Snapshot, make_policy,
)
from agentcg.records import ToolCallRecord

if TYPE_CHECKING:
    from agentcg.controller.daemon.service import Daemon

MAX_EVENTS = 1024                 # events kept between two ticks
NEAR_BUDGET = 0.5                 # a sandbox's calls are read each tick from this share of its budget on


class PolicyRunner:
    def __init__(self, name: str, daemon: "Daemon", dry_run: bool, host_budget_bytes: int | None) -> None:
        if name not in POLICY_NAMES:
            raise InvalidInput(f"unknown policy {name!r}; choose one of {', '.join(POLICY_NAMES)}")
        self.name = name
        self.d = daemon
        self.policy = make_policy(name)
        self.state = self.policy.initial_state()
        self.enforcer = Enforcer(daemon.tree, dry_run=dry_run, locate=Layout().locate)
        self.host_budget_bytes = host_budget_bytes
        self.events: list[Event] = []
        self.frozen: set[str] = set()
        self.throttle: dict[str, int] = {}
        self._readings: dict[str, tuple[int, int]] = {}    # call id -> (usage, peak) last read

    @property
    def dry_run(self) -> bool:
        return self.enforcer.dry_run

    def call_ended(self, record: ToolCallRecord) -> None:
        self.frozen.discard(record.call_id)
        self.throttle.pop(record.call_id, None)
        self._readings.pop(record.call_id, None)
        if len(self.events) < MAX_EVENTS:
            self.events.append(Event(time.monotonic(), "oom_kill" if record.oom_killed else "call_exit",
                                     record.sandbox, record.call_id, record.tool, record.peak_memory_bytes))

    def tick(self, observed_at: float) -> list[Applied]:
        snapshot = self.snapshot()
        self.events = []
        actions, self.state = self.policy.decide(snapshot, self.state)
        applied = self.enforcer.apply(actions)
        for item in applied:
            self._track(item)
            self.d.stats.observe_action(item.action.kind, item.action.reason,
                                        max(0.0, item.time_s + item.latency_s - observed_at)
                                        if item.ok and not item.dry_run else None)
        return applied

    def _track(self, item: Applied) -> None:
        action = item.action
        if not item.ok or item.dry_run or action.call_id is None:
            return
        if action.kind == FREEZE:
            self.frozen.add(action.call_id)
        elif action.kind == THAW:
            self.frozen.discard(action.call_id)
        elif action.kind == THROTTLE:
            self.throttle[action.call_id] = self.throttle.get(action.call_id, 0) + 1
        elif action.kind == RELAX:
            self.throttle.pop(action.call_id, None)
        elif action.kind == KILL:
            self.d.calls.note(action.call_id, "kill", action.message or action.reason)

    def snapshot(self) -> Snapshot:
        """Sandboxes are read every tick; their calls only while the sandbox (or the host) is
        near its budget (>= NEAR_BUDGET of it) or has a frozen or throttled call: elsewhere no
        policy acts, and a call's last reading stands (a new call is read once). So an idle
        tick with 1,000 calls far below their budgets reads one file per sandbox, not 2,000."""
        tree, now = self.d.tree, time.monotonic()
        by_sandbox: dict[str, list] = {}
        for call in self.d.calls.running():
            by_sandbox.setdefault(call.sandbox, []).append(call)
        host = _read(lambda: tree.memory_current("")) if tree.exists("") else None
        host_hot = (self.host_budget_bytes is not None and host is not None
                    and host >= NEAR_BUDGET * self.host_budget_bytes)
        has_peak = "memory.peak" in tree.capabilities
        views = []
        for name, entry in sorted(self.d.state.sandboxes.items()):
            usage = _read(lambda: tree.memory_current(name))
            if usage is None:
                continue
            mine = by_sandbox.get(name, ())
            hot = (host_hot or (entry.memory_budget_bytes is not None and usage >= NEAR_BUDGET * entry.memory_budget_bytes)
                   or any(c.call_id in self.frozen or c.call_id in self.throttle for c in mine))
            calls = []
            for call in mine:
                reading = None if hot else self._readings.get(call.call_id)
                if reading is None:
                    used = _read(lambda: tree.memory_current(call.path))
                    if used is None:
                        continue
                    peak = _read(lambda: tree.memory_peak(call.path)) if has_peak else None
                    reading = self._readings[call.call_id] = (used, max(used, peak or 0))
                calls.append(CallView(call.call_id, call.tool, reading[0], reading[1],
                                      now - call.start_monotonic_s, call.mem_hint_bytes,
                                      call.call_id in self.frozen, self.throttle.get(call.call_id, 0)))
            pressure = _read(lambda: tree.pressure(name, "memory")) if "psi" in tree.capabilities else None
            views.append(SandboxView(name, entry.priority, usage, entry.memory_budget_bytes,
                                     pressure.some.avg10 if pressure else 0.0, tuple(calls)))
        if len(self._readings) > 2 * sum(map(len, by_sandbox.values())) + 64:   # calls discarded unrecorded
            live = {c.call_id for calls in by_sandbox.values() for c in calls}
            self._readings = {k: v for k, v in self._readings.items() if k in live}
        return Snapshot(now, host if host is not None else sum(v.usage_bytes for v in views),
                        self.host_budget_bytes, tuple(views), tuple(self.events))


def _read(fn):  # type: ignore[no-untyped-def]
    """A cgroup reading, or None when the cgroup went away or the host lacks the file."""
    try:
        return fn()
    except AgentcgError:
        return None
