"""The control core for local mode: a ToolCallManager without a daemon (`agentcg run` as
root, `sandbox exec` in-process) decides through the same ControlCore as the daemon and
replay: the same snapshot builder, policy and event log.

    local = LocalControl(tree, "agentcg", budgets={"sb": 1 << 30})
    mgr = ToolCallManager(tree, control=local)
    call = mgr.begin("sb", "pytest", argv, mem_hint_bytes=300 << 20)   # waits for room, bounded
    local.poll()                                                       # a policy step, from a loop

There is no epoll here: `begin` waits in steps of `tick_s` (at most the policy's
max_wait_s), and a caller with a loop runs `poll()` on its own tick.
"""
from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING, Any, Mapping

from agentcg.controller.cgroup import CgroupTree
from agentcg.controller.core.events import EventLog
from agentcg.controller.core.loop import ControlCore, Step
from agentcg.controller.core.snapshot import CallInput, Inputs, SandboxInput
from agentcg.controller.enforce import Layout
from agentcg.policies.sandbox import GraduatedConfig

if TYPE_CHECKING:
    from agentcg.controller.toolcall import ToolCall, ToolCallManager
    from agentcg.records import ToolCallRecord


class LocalControl:
    def __init__(self, tree: CgroupTree, policy: str = "agentcg", *, budgets: Mapping[str, int] | None = None,
                 priorities: Mapping[str, str] | None = None, config: GraduatedConfig | None = None,
                 host_budget_bytes: int | None = None, tick_s: float = 0.1, log: EventLog | None = None) -> None:
        self.core = ControlCore(tree, policy, config=config, locate=Layout().locate, log=log)
        self.tree, self.tick_s = tree, tick_s
        self.budgets, self.priorities = dict(budgets or {}), dict(priorities or {})
        self.host_budget_bytes = host_budget_bytes
        self.manager: "ToolCallManager | None" = None
        self._lock = threading.Lock()

    def bind(self, manager: "ToolCallManager") -> None:
        self.manager = manager

    def inputs(self) -> Inputs:
        running = self.manager.running() if self.manager is not None else []
        names = sorted({c.sandbox for c in running} | set(self.budgets))
        sandboxes = tuple(SandboxInput(n, n, self.priorities.get(n, "normal"), self.budgets.get(n)) for n in names)
        calls = tuple(CallInput(c.sandbox, c.call_id, c.tool, c.path, c.start_monotonic_s, c.mem_hint_bytes)
                      for c in running if (c.sandbox, c.call_id) not in self.core.pending)
        return Inputs(sandboxes, calls, host_path="" if self.tree.exists("") else None,
                      host_budget_bytes=self.host_budget_bytes)

    def poll(self) -> Step:
        with self._lock:
            return self.core.step(self.inputs(), time.monotonic())

    def admit(self, call: "ToolCall") -> dict[str, Any]:
        """Block until the policy admits `call` (its cgroup exists, nothing runs in it yet);
        bounded by the policy's max_wait_s plus two ticks. Returns {"waited_s", "reason"}."""
        key = (call.sandbox, call.call_id)
        started = time.monotonic()
        self.core.add_pending(call.sandbox, call.call_id, call.tool, call.mem_hint_bytes, started)
        limit = self.core.config.max_wait_s + 2 * self.tick_s
        while True:
            step = self.poll()
            for admitted, action, waited in step.admitted:
                if admitted == key:
                    return {"waited_s": waited, "reason": action.reason}
            if time.monotonic() - started > limit:
                self.core.drop_pending(*key)
                return {"waited_s": time.monotonic() - started, "reason": "waited past max_wait_s; started anyway"}
            time.sleep(self.tick_s)

    def cancel(self, call: "ToolCall") -> None:
        self.core.drop_pending(call.sandbox, call.call_id)

    def ended(self, record: "ToolCallRecord") -> None:
        peak = record.peak_memory_bytes if record.peak_memory_bytes is not None else record.peak_rss_bytes
        with self._lock:
            self.core.call_ended(record.sandbox, record.call_id, record.tool, peak,
                                 oom_killed=bool(record.oom_killed), now=time.monotonic())
            self.core.killed.pop((record.sandbox, record.call_id), None)
