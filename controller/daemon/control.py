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
from agentcg.controller.daemon.call_index import IndexedCalls
from agentcg.controller.daemon.config import PolicySection
from agentcg.controller.daemon.metrics import DaemonStats
from agentcg.controller.daemon.state import DaemonState
from agentcg.controller.enforce import Layout
from agentcg.controller.toolcall import ToolCall
from agentcg.policies.sandbox import KILL
from agentcg.records import ToolCallRecord

NEAR_BUDGET = 0.5      # a sandbox's calls are read each step from this share of its budget on

log = logging.getLogger("agentcg.daemon")


class DaemonControl:
    def __init__(self, tree: CgroupTree, calls: IndexedCalls, state: DaemonState, stats: DaemonStats,
                 policy: PolicySection, events: EventLog) -> None:
        self.tree, self.calls, self.state, self.stats = tree, calls, state, stats
        self.settings = policy
        self.core = ControlCore(tree, policy.name, config=policy.graduated, dry_run=policy.dry_run,
                                locate=Layout().locate, log=events)
        self.thresholds = Thresholds.of(policy.graduated)
        self.host_budget_bytes = policy.host_budget_bytes     # what the engines leave to sandboxes
        # sandbox -> ((its calls' version, its calls waiting for admission), its CallInputs)
        self._groups: dict[str, tuple[tuple[int, frozenset[str]], tuple[CallInput, ...]]] = {}
        self._inputs: dict[str, CallInput] = {}                 # call id -> its last CallInput

    @property
    def name(self) -> str:
        return self.core.policy_name

    def set_policy(self, name: str, dry_run: bool) -> None:
        self.core.set_policy(name, dry_run=dry_run, config=self.settings.graduated)

    # ---- inputs ---------------------------------------------------------------------
    def inputs(self, read_psi: bool = True) -> Inputs:
        sandboxes = tuple(SandboxInput(name, name, e.priority, e.memory_budget_bytes)
                          for name, e in sorted(self.state.sandboxes.items()))
        return Inputs(sandboxes, host_path="" if self.tree.exists("") else None, host_budget_bytes=self.host_budget_bytes,
                      read_psi=read_psi, near_budget=NEAR_BUDGET, call_groups=self.call_groups())

    def call_groups(self) -> dict[str, tuple[CallInput, ...]]:
        """The running calls per sandbox, less those waiting for admission. A sandbox whose
        calls did not change since the last step gets the same tuple again (Inputs.call_groups:
        the snapshot then reuses its views while it is cold), so a step costs O(sandboxes +
        calls that changed), not O(calls)."""
        waiting: dict[str, set[str]] = {}
        for sandbox, call_id in self.core.pending:
            waiting.setdefault(sandbox, set()).add(call_id)
        groups, kept = {}, {}
        for sandbox, version in self.calls.versions().items():
            key = (version, frozenset(waiting.get(sandbox, ())))
            entry = self._groups.get(sandbox)
            if entry is None or entry[0] != key:
                entry = (key, tuple(self._input(c) for c in self.calls.calls_of(sandbox) if c.call_id not in key[1]))
            kept[sandbox], groups[sandbox] = entry, entry[1]
        self._groups = kept
        if len(self._inputs) > 2 * self.calls.count() + 64:     # calls that ended: bounded by the running
            self._inputs = {cid: v for cid, v in self._inputs.items() if self.calls.has(cid)}
        return groups

    def _input(self, call: ToolCall) -> CallInput:
        """The call's CallInput, the same object while nothing in it changed (snapshot.Views
        reuses a cold call's view for it)."""
        known = self._inputs.get(call.call_id)
        if (known is None or known.sandbox != call.sandbox or known.tool != call.tool or known.path != call.path
                or known.started_s != call.start_monotonic_s or known.hint_bytes != call.mem_hint_bytes):
            known = self._inputs[call.call_id] = CallInput(call.sandbox, call.call_id, call.tool, call.path,
                                                           call.start_monotonic_s, call.mem_hint_bytes)
        return known

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
            if not budget:          # no threshold to arm (the same as None for each call, at no cost per call)
                continue
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
