"""The daemon's side of the control core: what exists (sandboxes from the daemon's state,
running calls), the host budget the engines leave to sandboxes, and what to do with a
step's results (metrics, what the records say about a kill, the kernel thresholds to
re-arm). The daemon's socket, epoll and engine links stay in service.py.

It gets narrow pieces (tree, calls, state, stats, event log), never the Daemon.
"""
from __future__ import annotations

import logging
import time
from typing import Any

from agentcg.controller.cgroup import CgroupTree
from agentcg.controller.core import (
    CallInput, ControlCore, EventLog, Inputs, SandboxInput, Step, Thresholds, call_threshold_bytes,
)
from agentcg.controller.daemon.calls import DaemonCalls
from agentcg.controller.daemon.config import PolicySection
from agentcg.controller.daemon.metrics import DaemonStats
from agentcg.controller.daemon.state import DaemonState
from agentcg.controller.enforce import Layout
from agentcg.controller.toolcall import ToolCall
from agentcg.policies.sandbox import KILL
from agentcg.records import ToolCallRecord

log = logging.getLogger("agentcg.daemon")


class DaemonControl:
    def __init__(self, tree: CgroupTree, calls: DaemonCalls, state: DaemonState, stats: DaemonStats,
                 policy: PolicySection, events: EventLog) -> None:
        self.tree, self.calls, self.state, self.stats = tree, calls, state, stats
        self.settings = policy
        self.core = ControlCore(tree, policy.name, config=policy.graduated, dry_run=policy.dry_run,
                                locate=Layout().locate, log=events)
        self.thresholds = Thresholds.of(policy.graduated)
        self.host_budget_bytes = policy.host_budget_bytes     # what the engines leave to sandboxes

    @property
    def name(self) -> str:
        return self.core.policy_name

    def set_policy(self, name: str, dry_run: bool) -> None:
        self.core.set_policy(name, dry_run=dry_run, config=self.settings.graduated)

    # ---- inputs ---------------------------------------------------------------------
    def inputs(self, read_psi: bool = True) -> Inputs:
        sandboxes = tuple(SandboxInput(name, name, e.priority, e.memory_budget_bytes)
                          for name, e in sorted(self.state.sandboxes.items()))
        pending = self.core.pending
        calls = tuple(CallInput(c.sandbox, c.call_id, c.tool, c.path, c.start_monotonic_s, c.mem_hint_bytes)
                      for c in self.calls.running() if (c.sandbox, c.call_id) not in pending)
        return Inputs(sandboxes, calls, host_path="" if self.tree.exists("") else None,
                      host_budget_bytes=self.host_budget_bytes, read_psi=read_psi)

    # ---- the step -----------------------------------------------------------------------
    def step(self, observed_s: float | None = None, *, urgent: bool = False) -> Step | None:
        """One decision; None when the policy failed (logged and counted: the next step retries).
        `urgent` (a kernel threshold crossed): skip the PSI readings, which no decision needs."""
        self.stats.ticks += 1
        try:
            step = self.core.step(self.inputs(read_psi=not urgent), time.monotonic(), observed_s=observed_s)
        except Exception:  # a policy bug must not take the daemon (and every sandbox's API) down
            log.exception("policy %s failed this step; the next one tries again", self.name)
            self.stats.observe_action("error", "policy_failed")
            return None
        reactions = {id(applied): latency for applied, latency in step.reactions}
        for item in step.applied:
            action = item.action
            self.stats.observe_action(action.kind, action.reason, reactions.get(id(item)))
            if action.kind == KILL and item.ok and not item.dry_run and action.call_id:
                try:
                    self.calls.note(action.call_id, "kill", action.message or action.reason)
                except Exception:   # the call ended first
                    pass
        for _, action in step.deferred:
            self.stats.observe_action(action.kind, action.reason)
        for _, action, waited in step.admitted:
            self.stats.observe_admission(waited if (action.value_bytes is not None or waited > 0) else None)
        return step

    def call_ended(self, record: ToolCallRecord) -> None:
        peak = record.peak_memory_bytes if record.peak_memory_bytes is not None else record.peak_rss_bytes
        self.core.call_ended(record.sandbox, record.call_id, record.tool, peak, oom_killed=bool(record.oom_killed),
                             now=time.monotonic())
        self.core.killed.pop((record.sandbox, record.call_id), None)

    # ---- admission ------------------------------------------------------------------
    def wait_for_admission(self, call: ToolCall) -> None:
        self.core.add_pending(call.sandbox, call.call_id, call.tool, call.mem_hint_bytes, time.monotonic())

    def pending_objects(self) -> list[dict[str, Any]]:
        now = time.monotonic()
        return [{"call_id": p.call_id, "sandbox": p.sandbox, "tool": p.tool, "hint_bytes": p.hint_bytes,
                 "need_bytes": p.need_bytes, "waited_s": now - p.since_s, "reason": p.reason}
                for p in self.core.pending.values()]

    # ---- thresholds the kernel reports ------------------------------------------------
    def call_thresholds(self, step: Step) -> dict[str, int | None]:
        """call id -> the RSS at which its scope reaches the next configured fraction."""
        out: dict[str, int | None] = {}
        if self.core.policy_name != "agentcg" or not self.settings.kernel_thresholds:
            return out
        host_budget = self.host_budget_bytes
        for sb in step.snapshot.sandboxes:
            budget, scope = (sb.budget_bytes, sb.usage_bytes) if sb.budget_bytes else (host_budget,
                                                                                    step.snapshot.host_usage_bytes)
            for call in sb.calls:
                out[call.call_id] = call_threshold_bytes(budget, scope, call.usage_bytes, self.thresholds)
            for (sandbox, call_id), _, _ in step.admitted:     # starting now: armed before it allocates
                if sandbox == sb.name:
                    out[call_id] = call_threshold_bytes(budget, scope, 0, self.thresholds)
        return out

    def sandbox_budgets(self) -> dict[str, int]:
        """Scope ("" = the tree's root, for the host budget) -> budget, for memcg thresholds."""
        if self.core.policy_name != "agentcg" or not self.settings.kernel_thresholds:
            return {}
        out = {name: e.memory_budget_bytes for name, e in self.state.sandboxes.items() if e.memory_budget_bytes}
        if self.host_budget_bytes:
            out[""] = self.host_budget_bytes
        return out
