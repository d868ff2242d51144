"""Kernel events that need a decision now, in the daemon's epoll:

- the eBPF ring buffer: libbpf's `ring_buffer__epoll_fd` (BpfMonitor.fileno()) is itself
  an epoll fd, readable when a record is waiting; the daemon waits on it with everything
  else, so an RSS threshold crossing wakes it at once (no polling interval).
- cgroup v1 memcg usage thresholds (controller/cgroup/threshold.py): one eventfd per
  configured fraction of each sandbox's budget (and of the host budget on the tree's
  root), registered in the same epoll.
- per-call eBPF RSS thresholds, armed after every step (DaemonControl.call_thresholds).

On pure cgroup v2 there are no memcg thresholds: the eBPF threshold when it is loaded,
else PSI triggers and the tick (service.py). Each crossing reports (sandbox, call_id or
None, observed_s): the kernel's timestamp for a ring-buffer event (bpf_ktime_get_ns is
CLOCK_MONOTONIC), the time the eventfd was read for a memcg threshold.
"""
from __future__ import annotations

import logging
import select
from typing import Any, Callable

from agentcg.controller.cgroup import CgroupTree
from agentcg.controller.cgroup.threshold import UsageThreshold
from agentcg.controller.core import Thresholds, needs_rearm, sandbox_thresholds
from agentcg.controller.daemon.metrics import DaemonStats
from agentcg.errors import AgentcgError

log = logging.getLogger("agentcg.daemon")

Crossing = tuple[str, "str | None", float, dict]        # sandbox, call_id, observed_s, detail
DECIDE_KINDS = ("rssthreshold", "oomvictim", "reclaimstall")


class Reactor:
    def __init__(self, tree: CgroupTree, monitor: Any, thresholds: Thresholds, stats: DaemonStats,
                 register: Callable[[int, int, Callable[[int, int], None]], None],
                 unregister: Callable[[int], None], call_of: Callable[[int], "tuple[str, str] | None"],
                 react: Callable[[list[Crossing]], None], log_event: Callable[..., Any]) -> None:
        self.tree, self.monitor, self.thresholds, self.stats = tree, monitor, thresholds, stats
        self._register, self._unregister = register, unregister
        self._call_of, self._react, self._log_event = call_of, react, log_event
        self._memcg: dict[str, list[UsageThreshold]] = {}     # scope -> its thresholds
        self._memcg_budget: dict[str, int] = {}
        self._memcg_refused: set[str] = set()
        self._armed: dict[int, int | None] = {}              # cgroup id -> RSS threshold armed
        self._fired: dict[int, int] = {}                     # cgroup id -> RSS when its threshold fired
        self._ring_fd: int | None = None
        self.memcg_available = "memory.usage_in_bytes" in _v1_files(tree)

    @property
    def mode(self) -> str:
        parts = []
        if self._ring_fd is not None:
            parts.append("ebpf-ringbuf-epoll")
        if self.memcg_available:
            parts.append("memcg-eventfd")
        return "+".join(parts) or "psi-and-tick"

    def start(self) -> None:
        if self.monitor is None:
            return
        try:
            self._ring_fd = self.monitor.fileno()
        except AgentcgError as exc:
            log.warning("the eBPF ring buffer has no epoll fd (%s); its events are read on the tick", exc)
            return
        self._register(self._ring_fd, select.EPOLLIN, self._on_ring)

    def close(self) -> None:
        if self._ring_fd is not None:
            self._unregister(self._ring_fd)
            self._ring_fd = None
        for scope in list(self._memcg):
            self._drop_scope(scope)

    # ---- eBPF ---------------------------------------------------------------------------
    def drain(self) -> None:
        """Read the ring buffer now (also the fallback when it has no fd)."""
        if self.monitor is not None:
            self._on_ring(-1, 0)

    def _on_ring(self, fd: int, mask: int) -> None:
        try:
            events = self.monitor.poll(0)
        except AgentcgError as exc:
            log.error("eBPF poll: %s", exc)
            return
        crossings: list[Crossing] = []
        for event in events:
            kind = type(event).__name__.removesuffix("Event").lower()
            self.stats.bump(self.stats.bpf_events, kind)
            if kind not in DECIDE_KINDS:
                continue
            owner = self._call_of(event.cgroup_id)
            sandbox, call_id = owner if owner else (None, None)
            detail = {"source": "ebpf", "event": kind, "kernel_monotonic_s": event.monotonic_s,
                      "cgroup_id": event.cgroup_id, "pid": event.pid}
            if kind == "rssthreshold":
                detail.update(rss_bytes=event.rss_bytes, threshold_bytes=event.threshold_bytes)
                self._fired[event.cgroup_id] = event.rss_bytes   # re-armed above this, after the step
            elif kind == "reclaimstall":
                self._log_event("reclaim_stall", sandbox, call_id, {**detail, "stall_s": event.stall_s})
            if sandbox is not None:
                crossings.append((sandbox, call_id, event.monotonic_s, detail))
        if crossings:
            self._react(crossings)

    def arm_calls(self, wanted: dict[int, int | None]) -> None:
        """cgroup id -> RSS threshold (None clears); written only where it changed."""
        if self.monitor is None or "faults" not in getattr(self.monitor, "concerns", ()):
            return   # RSS thresholds need the opt-in per-fault concern; memcg thresholds cover the rest
        watched = self.monitor.watched()
        for cgroup_id in [c for c in self._armed if c not in wanted]:
            del self._armed[cgroup_id]
            self._fired.pop(cgroup_id, None)
        for cgroup_id, threshold in wanted.items():
            if cgroup_id not in watched:
                continue
            fired = self._fired.get(cgroup_id)
            if fired is not None and (threshold is None or threshold <= fired):
                continue     # a fired threshold stays until one above the RSS it fired at is due
            if cgroup_id in self._armed and fired is None and not needs_rearm(self._armed[cgroup_id], threshold):
                continue
            self._fired.pop(cgroup_id, None)
            try:
                self.monitor.set_rss_threshold(cgroup_id, threshold)
                self._armed[cgroup_id] = threshold
            except AgentcgError:
                self._armed.pop(cgroup_id, None)

    # ---- memcg v1 thresholds -------------------------------------------------------------
    def arm_scopes(self, budgets: dict[str, int]) -> None:
        """scope -> budget: one eventfd per configured fraction; re-registered when it changes."""
        if not self.memcg_available:
            return
        for scope in [s for s in self._memcg if budgets.get(s) != self._memcg_budget.get(s)]:
            self._drop_scope(scope)
        for scope, budget in budgets.items():
            if scope in self._memcg or scope in self._memcg_refused or not self.tree.exists(scope):
                continue
            armed = []
            try:
                directory = self.tree.cgroup_dir(scope, "memory")
                for threshold in sandbox_thresholds(budget, self.thresholds):
                    t = UsageThreshold(directory, threshold)
                    armed.append(t)
                    self._register(t.fileno(), select.EPOLLIN,
                                   lambda fd, mask, scope=scope, t=t: self._on_memcg(scope, t))
            except AgentcgError as exc:
                log.warning("no memory thresholds on %s: %s", scope or "the root", exc)
                self._memcg_refused.add(scope)
            self._memcg[scope], self._memcg_budget[scope] = armed, budget

    def _on_memcg(self, scope: str, t: UsageThreshold) -> None:
        count, read_s = t.read()
        if not count:
            return
        self.stats.bump(self.stats.memcg_thresholds, "root" if scope == "" else "sandbox")
        usage = t.usage_bytes()
        if usage is not None and usage < t.threshold_bytes:
            return               # crossed downwards: the tick relaxes, nothing urgent
        self._react([(scope, None, read_s, {"source": "memcg", "threshold_bytes": t.threshold_bytes,
                                            "usage_bytes": usage, "read_monotonic_s": read_s})])

    def forget_scope(self, scope: str) -> None:
        self._memcg_refused.discard(scope)
        self._drop_scope(scope)

    def _drop_scope(self, scope: str) -> None:
        for t in self._memcg.pop(scope, []):
            self._unregister(t.fileno())
            t.close()
        self._memcg_budget.pop(scope, None)


def _v1_files(tree: CgroupTree) -> set[str]:
    try:
        directory = tree.cgroup_dir("", "memory")
    except AgentcgError:
        return set()
    return {"memory.usage_in_bytes"} if (directory.parent / "memory.usage_in_bytes").exists() or \
        (directory / "memory.usage_in_bytes").exists() else set()
