"""Turn sandbox-policy actions into cgroup writes, or describe them (dry run).

    enforcer = Enforcer(tree, locate=Layout("replay").locate)
    for applied in enforcer.apply(actions): ...

Where the host lacks a knob the enforcer degrades and says so in `Applied.detail`:
- throttle without memory.high (cgroup v1 memory has no threshold throttle): cpu.max at
  the action's `cpu_max_cores` instead. It slows the call (allocation is CPU work too)
  but does not stop it at a byte count; `degraded` is True.
- admit's initial memory.high without memory.high: not applied (degraded).
- protect's memory.low on v1: the soft limit (a reclaim ranking, not a protection; see
  agentcg.controller.cgroup.v1).
- freeze: cgroup.freeze is written first and that write's return is timed
  (`Applied.write_returned_s`: the reaction's end), then the tree confirms every task
  frozen (`latency_s` includes that wait, which needs the frozen tasks to be scheduled).
A call that exited before its action landed reads `CgroupGone`: recorded (ok=False),
never raised. Other cgroup errors are recorded the same way; the loop goes on.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

from agentcg.controller.cgroup import UNLIMITED, CgroupTree
from agentcg.controller.cgroup._fs import write as write_cgroup_file
from agentcg.errors import AgentcgError, CgroupGone, InvalidInput
from agentcg.policies.sandbox.types import (
    ADMIT, DEFER, FREEZE, KILL, LIMIT, PROTECT, RELAX, THAW, THROTTLE, Action,
)
from agentcg.units import format_bytes

CPU_PERIOD_S = 0.1


@dataclass(frozen=True)
class Layout:
    """Where sandboxes and tool calls live below a tree's root: <base>/<sandbox>/agent,
    <base>/<sandbox>/tools/<call_id>."""

    base: str = ""

    def sandbox(self, sandbox: str) -> str:
        return f"{self.base}/{sandbox}" if self.base else sandbox

    def agent(self, sandbox: str) -> str:
        return f"{self.sandbox(sandbox)}/agent"

    def tools(self, sandbox: str) -> str:
        return f"{self.sandbox(sandbox)}/tools"

    def call(self, sandbox: str, call_id: str) -> str:
        return f"{self.tools(sandbox)}/{call_id}"

    def locate(self, sandbox: str, call_id: str | None) -> str:
        return self.sandbox(sandbox) if call_id is None else self.call(sandbox, call_id)


@dataclass(frozen=True)
class Applied:
    action: Action
    ok: bool
    latency_s: float
    detail: str              # what was written (or would be), or why it failed
    degraded: bool = False   # done with a weaker knob than the action asked for
    dry_run: bool = False
    time_s: float = 0.0      # time.monotonic() when it was applied
    write_returned_s: float | None = None   # when its first cgroup write returned (freeze), else None


class Enforcer:
    def __init__(self, tree: CgroupTree, dry_run: bool = False,
                 locate: Callable[[str, str | None], str] | None = None) -> None:
        self.tree = tree
        self.dry_run = dry_run
        self.locate = locate or Layout().locate
        caps = tree.capabilities
        self._has_high = "memory.high" in caps
        self._has_cpu_max = "cpu.max" in caps

    def apply(self, actions: list[Action]) -> list[Applied]:
        return [self.apply_one(action) for action in actions]

    def apply_one(self, action: Action) -> Applied:
        if action.kind == KILL and action.call_id is None:
            raise InvalidInput("a kill needs a call_id: agentcg kills tool calls, never a sandbox or its agent")
        path = self.locate(action.sandbox, action.call_id)
        plan = self._plan(action, path)
        started = time.monotonic()
        if self.dry_run:
            return Applied(action, True, 0.0, f"dry run: would {plan.detail}", plan.degraded, True, started)
        first: float | None = None
        try:
            for step in plan.steps:
                step()
                if first is None and plan.timed_first:
                    first = time.monotonic()
        except CgroupGone:
            return Applied(action, False, time.monotonic() - started, f"{path} is gone (the call ended first)",
                           plan.degraded, False, started, first)
        except AgentcgError as exc:
            return Applied(action, False, time.monotonic() - started, f"{type(exc).__name__}: {exc}",
                           plan.degraded, False, started, first)
        return Applied(action, True, time.monotonic() - started, plan.detail, plan.degraded, False, started, first)

    def _plan(self, action: Action, path: str) -> "_Plan":
        tree, kind, value = self.tree, action.kind, action.value_bytes
        if kind == THROTTLE:
            if self._has_high and value is not None:
                return _Plan(f"set {path} memory.high={value} ({format_bytes(value)})",
                             [lambda: tree.set_memory(path, high=value)])
            if self._has_cpu_max and action.cpu_max_cores:
                cores = action.cpu_max_cores
                return _Plan(f"set {path} cpu.max={cores:g} CPU (memory.high unavailable on this host: "
                             "throttled by CPU instead of at a byte count)",
                             [lambda: tree.set_cpu(path, max_s=cores * CPU_PERIOD_S, period_s=CPU_PERIOD_S)],
                             degraded=True)
            return _Plan("throttle: neither memory.high nor cpu.max is available here; nothing written", [],
                         degraded=True)
        if kind == RELAX:
            steps, parts = [], []
            if self._has_high:
                steps.append(lambda: tree.set_memory(path, high=UNLIMITED))
                parts.append("memory.high=max")
            if self._has_cpu_max:
                steps.append(lambda: tree.set_cpu(path, max_s=UNLIMITED, period_s=CPU_PERIOD_S))
                parts.append("cpu.max=max")
            return _Plan(f"set {path} {' '.join(parts) or '(nothing to relax on this host)'}", steps)
        if kind == FREEZE:
            if "freeze" in tree.capabilities:
                control = tree.cgroup_dir(path, "v2") / "cgroup.freeze"
                return _Plan(f"freeze {path}", [lambda: write_cgroup_file(control, "1"), lambda: tree.freeze(path)],
                             timed_first=True)
            return _Plan(f"freeze {path}", [lambda: tree.freeze(path)])
        if kind == THAW:
            return _Plan(f"thaw {path}", [lambda: tree.thaw(path)])
        if kind == KILL:
            return _Plan(f"kill every process in {path}", [lambda: tree.kill(path)])
        if kind == LIMIT:
            if value is None:
                raise InvalidInput(f"a limit action needs value_bytes (memory.max of {path})")
            return _Plan(f"set {path} memory.max={value} ({format_bytes(value)})",
                         [lambda: tree.set_memory(path, max=value)])
        if kind == PROTECT:
            steps, parts = [], []
            if value is not None:
                steps.append(lambda: tree.set_memory(path, low=value))
                parts.append(f"memory.low={value}" + ("" if self._has_high else " (v1: as the soft limit)"))
            if action.cpu_weight is not None:
                weight = action.cpu_weight
                steps.append(lambda: tree.set_cpu(path, weight=weight))
                parts.append(f"cpu.weight={weight}")
            return _Plan(f"set {path} {' '.join(parts) or '(nothing)'}", steps)
        if kind == ADMIT:
            if value is None:
                return _Plan(f"admit {path} without a limit", [])
            if self._has_high:
                return _Plan(f"admit {path} with memory.high={value} ({format_bytes(value)})",
                             [lambda: tree.set_memory(path, high=value)])
            return _Plan(f"admit {path}; its initial memory.high {format_bytes(value)} is not applied "
                         "(no memory.high on this host)", [], degraded=True)
        if kind == DEFER:
            return _Plan(f"defer {path}: nothing written, the caller waits", [])
        raise InvalidInput(f"unknown action kind {kind!r}")


@dataclass
class _Plan:
    detail: str
    steps: list[Callable[[], None]]
    degraded: bool = False
    timed_first: bool = False     # the first step is the write the reaction is timed to
