"""Kernel events that need a decision now, in the daemon's epoll:

- the eBPF ring buffer: libbpf's `ring_buffer__epoll_fd` (BpfMonitor.fileno()) is itself
  an epoll fd, readable when a record is waiting; the daemon waits on it with everything
  else, so an RSS threshold crossing wakes it at once (no polling interval).
- cgroup v1 memcg usage thresholds (controller/cgroup/threshold.py): one eventfd per
  configured fraction of each sandbox's budget (and of the host budget on the tree's
  root), and one per running tool call (each call has its own v1 memory cgroup) at the
  usage where its scope reaches the next fraction (DaemonControl.call_thresholds),
  re-armed after every step and closed when the call ends; all in the same epoll. This is
  the default configuration's per-call reaction: no per-fault program needed.
- per-call eBPF RSS thresholds when the opt-in `faults` concern is loaded (the only
  per-call threshold on pure cgroup v2), armed after every step.

On pure cgroup v2 there are no memcg thresholds: the eBPF threshold when `faults` is
loaded, else PSI triggers and the tick (service.py); `mode` says which. Each crossing reports (sandbox, call_id or
None, observed_s): the kernel's timestamp for a ring-buffer event (bpf_ktime_get_ns is
CLOCK_MONOTONIC), the time the eventfd was read for a memcg threshold.
"""
from __future__ import annotations

import logging
import select
import time
from typing import Any, Callable, Iterable

from agentcg.controller.cgroup import CgroupTree
from agentcg.controller.cgroup.threshold import MemoryEventsWatch, Ticker, UsageThreshold
from agentcg.controller.core import Thresholds, needs_rearm, sandbox_thresholds
from agentcg.controller.core.thresholds import DRIFT_BYTES
from agentcg.controller.daemon.metrics import DaemonStats
from agentcg.errors import AgentcgError, CgroupGone

log = logging.getLogger("agentcg.daemon")

Crossing = tuple[str, "str | None", float, dict]        # sandbox, call_id, observed_s, detail
DECIDE_KINDS = ("rssthreshold", "oomvictim", "reclaimstall")
# A v1 memcg threshold is checked every 128 page events per CPU (mm/memcontrol-v1.c,
# THRESHOLDS_EVENTS_TARGET), after the page counter moved in batches of up to 64 pages
# (MEMCG_CHARGE_BATCH): the kernel can notice a crossing 192 pages after it, and later
# still when the allocating task is preempted in between (both cores busy:
# bench/bench_reaction.py). So a call's eventfd is armed EARLY_BYTES below its threshold
# (which is DRIFT_BYTES above the point where its sandbox reaches the fraction, whose own
# eventfd is exact); when it fires below the threshold, the daemon watches the call's
# (and its sandbox's) usage itself, every WATCH_PERIOD_S for at most WATCH_MAX_S, and
# reacts at the crossing.
EARLY_BYTES = DRIFT_BYTES + 192 * 4096
WATCH_PERIOD_S = 100e-6
WATCH_MAX_S = 0.05


class Reactor:
    def __init__(self, tree: CgroupTree, monitor: Any, thresholds: Thresholds, stats: DaemonStats,
                 register: Callable[[int, int, Callable[[int, int], None]], None],
                 unregister: Callable[[int], None], call_of: Callable[[int], "tuple[str, str] | None"],
                 react: Callable[[list[Crossing]], None], log_event: Callable[..., Any], *,
                 enabled: bool = True) -> None:
        self.tree, self.monitor, self.thresholds, self.stats = tree, monitor, thresholds, stats
        self._register, self._unregister = register, unregister
        self._call_of, self._react, self._log_event = call_of, react, log_event
        self._memcg: dict[str, list[UsageThreshold]] = {}     # scope -> its thresholds
        self._memcg_budget: dict[str, int] = {}
        self._memcg_refused: set[str] = set()
        self._armed: dict[int, int | None] = {}              # cgroup id -> RSS threshold armed
        self._fired: dict[int, int] = {}                     # cgroup id -> RSS when its threshold fired
        self._calls: dict[str, tuple[str, UsageThreshold, int]] = {}  # call id -> (sandbox, eventfd, threshold)
        self._watching: dict[str, tuple[float, int | None]] = {}   # call id -> (deadline, its sandbox's usage then)
        self._ticker: Ticker | None = None
        self._calls_refused: set[str] = set()
        self._ring_fd: int | None = None
        self.enabled = enabled                                     # [policy] kernel_thresholds
        self.memcg_available = "memory.usage_in_bytes" in _v1_files(tree)
        # pure v2: memory.events (high/max/oom) of sandboxes and calls, for want of usage thresholds
        self.events_available = not self.memcg_available and getattr(tree, "kind", "") == "v2" \
            and "memory.max" in tree.capabilities
        self._watches: dict[tuple[str, str | None], MemoryEventsWatch] = {}   # (sandbox, call id) -> watch

    @property
    def rss_thresholds(self) -> bool:
        return self.monitor is not None and "faults" in getattr(self.monitor, "concerns", ())

    @property
    def mode(self) -> str:
        """What wakes the daemon for a decision: `memcg-eventfd` (v1 usage thresholds per
        call and per sandbox), `ebpf-rss-threshold` (per call, `faults` loaded), else
        `psi-and-tick`; plus `ebpf-ringbuf-epoll` when the ring buffer (OOM victims, reclaim
        stalls, RSS events) is in the epoll."""
        parts = []
        if self.enabled and self.memcg_available:
            parts.append("memcg-eventfd")
        if self.enabled and self._ring_fd is not None and self.rss_thresholds:
            parts.append("ebpf-rss-threshold")
        if not parts:
            if self.enabled and self.events_available:
                parts.append("memory-events")
            parts.append("psi-and-tick")
        if self._ring_fd is not None:
            parts.append("ebpf-ringbuf-epoll")
        return "+".join(parts)

    def armed(self) -> dict[str, int]:
        """call id -> the memcg usage threshold armed on it now (tests, state)."""
        return {call_id: threshold for call_id, (_, _, threshold) in self._calls.items()}

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
        for call_id in list(self._calls):
            self.call_ended(call_id)
        for key in list(self._watches):
            self._unwatch(key)

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

    def arm_calls(self, wanted: dict[str, int | None], calls: Iterable[Any]) -> None:
        """call id -> the usage at which its scope reaches the next fraction (None: nothing
        to arm), for the running `calls` (ToolCall: call_id, sandbox, path, cgroup_id):
        a memcg threshold on the call's v1 memory cgroup, and the eBPF RSS threshold when
        `faults` is loaded; each written only where it changed. Calls not in `wanted` lose theirs."""
        calls = list(calls)
        self._arm_call_memcg(wanted, calls)
        self._watch_events([(c.sandbox, c.call_id, c.path) for c in calls if c.call_id in wanted])
        self._arm_call_rss({c.cgroup_id: wanted[c.call_id] for c in calls if c.call_id in wanted})

    def _arm_call_rss(self, wanted: dict[int, int | None]) -> None:
        """cgroup id -> RSS threshold (None clears); written only where it changed."""
        if not self.rss_thresholds:
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

    # ---- memcg v1 thresholds: per call -------------------------------------------------
    def _arm_call_memcg(self, wanted: dict[str, int | None], calls: list[Any]) -> None:
        if not self.memcg_available:
            return
        running = {c.call_id: c for c in calls}
        for call_id in [c for c in self._calls if wanted.get(c) is None or c not in running]:
            self.call_ended(call_id)
        for call_id, threshold in wanted.items():
            call = running.get(call_id)
            if call is None or threshold is None or call_id in self._calls_refused:
                continue
            old = self._calls.get(call_id)
            if old is not None and not needs_rearm(old[2], threshold):
                continue
            try:
                t = self._early(self.tree.cgroup_dir(call.path, "memory"), threshold)
            except CgroupGone:
                continue             # it ended meanwhile; call_ended follows
            except (AgentcgError, OSError) as exc:   # OSError: EMFILE (one eventfd per call: mind RLIMIT_NOFILE)
                log.warning("no memory threshold on tool call %s (the tick and the sandbox's thresholds cover it): %s",
                            call_id, exc)
                self._calls_refused.add(call_id)
                continue
            self._register(t.fileno(), select.EPOLLIN,
                           lambda fd, mask, sb=call.sandbox, cid=call_id, t=t, x=threshold: self._on_memcg(sb, t, cid, x))
            self._calls[call_id] = (call.sandbox, t, threshold)
            if old is not None:      # the new one is armed first: no gap
                self._unregister(old[1].fileno())
                old[1].close()

    @staticmethod
    def _early(directory: Any, threshold: int) -> UsageThreshold:
        """The eventfd of a call's `threshold`, armed EARLY_BYTES below it, unless the call
        holds that much already (the kernel signals crossings, not a level): then at it."""
        early = threshold - EARLY_BYTES
        if early <= 0:
            return UsageThreshold(directory, threshold)
        t = UsageThreshold(directory, early)
        usage = t.usage_bytes()
        if usage is not None and usage >= early:
            t.close()
            t = UsageThreshold(directory, threshold)
        return t

    def call_ended(self, call_id: str) -> None:
        """Close the call's memcg threshold (its eventfd), so none outlives the call."""
        self._calls_refused.discard(call_id)
        self._unwatch_call(call_id)
        for key in [k for k in self._watches if k[1] == call_id]:
            self._unwatch(key)
        entry = self._calls.pop(call_id, None)
        if entry is not None:
            self._unregister(entry[1].fileno())
            entry[1].close()

    # ---- memcg v1 thresholds: per sandbox and the root ----------------------------------
    def arm_scopes(self, budgets: dict[str, int]) -> None:
        """scope -> budget: one eventfd per configured fraction; re-registered when it changes."""
        if self.events_available and self.enabled:
            self._watch_events([(scope, None, scope) for scope in budgets if scope])
        if not self.memcg_available or not self.enabled:
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
            except (AgentcgError, OSError) as exc:
                log.warning("no memory thresholds on %s: %s", scope or "the root", exc)
                self._memcg_refused.add(scope)
            self._memcg[scope], self._memcg_budget[scope] = armed, budget

    def _on_memcg(self, scope: str, t: UsageThreshold, call_id: str | None = None,
                  threshold: int | None = None) -> None:
        count, read_s = t.read()
        if not count:
            return
        usage = t.usage_bytes()
        threshold = t.threshold_bytes if threshold is None else threshold
        if usage is not None and call_id is not None and t.threshold_bytes <= usage < threshold:
            self._watch_call(call_id, usage - t.threshold_bytes)   # armed early (EARLY_BYTES): watch the last stretch
            return
        kind = "call" if call_id is not None else "root" if scope == "" else "sandbox"
        self.stats.bump(self.stats.memcg_thresholds, kind)
        if usage is None or usage < threshold:
            return               # crossed downwards (the tick relaxes), or the cgroup went (it signals on removal)
        for watched in [c for c in self._watching if call_id in (c, None) and self._calls.get(c, ('',))[0] == scope]:
            self._watching.pop(watched)      # the crossing they watched for is here
        self._watching.pop(call_id or "", None)
        self._react([(scope, call_id, read_s, {"source": "memcg", "scope": kind, "threshold_bytes": threshold,
                                               "usage_bytes": usage, "read_monotonic_s": read_s})])
        self._unwatch_call(None)             # the timer goes after the enforcement write, not before it

    # ---- the short watch of a call armed early ----------------------------------------
    def _watch_call(self, call_id: str, grown_bytes: int) -> None:
        """Watch `call_id`, `grown_bytes` past its early mark: its sandbox's fractions count
        as crossed from the sandbox's usage when the call passed that mark (the kernel may
        report both eventfds in one check, and this one first)."""
        sandbox = self._calls[call_id][0]
        scope = self._memcg.get(sandbox)
        sb_usage = scope[0].usage_bytes() if scope else None
        self._watching[call_id] = (time.monotonic() + WATCH_MAX_S,
                                   None if sb_usage is None else sb_usage - max(0, grown_bytes))
        if self._ticker is None:
            try:
                self._ticker = Ticker(WATCH_PERIOD_S)
            except AgentcgError as exc:
                log.warning("no watch timer (%s): the kernel's own threshold check reports the crossing", exc)
                self._watching.clear()
                return
            self._register(self._ticker.fileno(), select.EPOLLIN, self._on_tick)
        self._on_tick(-1, 0)           # it may be across already

    def watching(self) -> set[str]:
        """The calls whose usage the daemon watches now (tests, state)."""
        return set(self._watching)

    def _arm_exact(self, call_id: str) -> None:
        """A watch ran out below the threshold (the call stopped short of it): the call's
        eventfd moves to the threshold itself, so the kernel still reports the crossing."""
        sandbox, old, threshold = self._calls[call_id]
        try:
            t = UsageThreshold(old.path, threshold)
        except (AgentcgError, OSError):
            return                   # gone, or out of fds: the sandbox's exact eventfds and the tick remain
        self._register(t.fileno(), select.EPOLLIN,
                       lambda fd, mask, sb=sandbox, cid=call_id, t=t, x=threshold: self._on_memcg(sb, t, cid, x))
        self._calls[call_id] = (sandbox, t, threshold)
        self._unregister(old.fileno())
        old.close()

    def _unwatch_call(self, call_id: str | None) -> None:
        if call_id is not None:
            self._watching.pop(call_id, None)
        if not self._watching and self._ticker is not None:
            self._unregister(self._ticker.fileno())
            self._ticker.close()
            self._ticker = None

    def _on_tick(self, fd: int, mask: int) -> None:
        """Each watched call: across its threshold, or its sandbox across one of its own,
        reacts now (as if its eventfd had fired); a watch past WATCH_MAX_S ends (the
        kernel's check at the threshold itself still stands: the sandbox's eventfds)."""
        if self._ticker is not None and fd >= 0:
            self._ticker.read()
        now = time.monotonic()
        crossings: list[Crossing] = []
        for call_id, (deadline, sb_before) in list(self._watching.items()):
            entry = self._calls.get(call_id)
            if entry is None:
                self._watching.pop(call_id, None)
                continue
            sandbox, t, threshold = entry
            usage = t.usage_bytes()
            crossed = None
            if usage is not None and usage >= threshold:
                crossed = {"source": "memcg", "scope": "call", "threshold_bytes": threshold, "usage_bytes": usage}
            elif sb_before is not None and self._memcg.get(sandbox):
                scope = self._memcg[sandbox]
                sb_usage = scope[0].usage_bytes()
                passed = [x.threshold_bytes for x in scope if sb_usage is not None
                          and sb_before < x.threshold_bytes <= sb_usage]
                if passed:          # one of the sandbox's fractions, crossed while this call grew
                    crossed = {"source": "memcg", "scope": "sandbox", "threshold_bytes": min(passed),
                               "usage_bytes": sb_usage}
            if crossed is not None:
                self.stats.bump(self.stats.memcg_thresholds, crossed["scope"])
                read_s = time.monotonic()
                crossed.update(read_monotonic_s=read_s, watched=True)
                crossings.append((sandbox, call_id, read_s, crossed))
                self._watching.pop(call_id, None)
            elif usage is None or now >= deadline:
                self._watching.pop(call_id, None)
                if usage is not None:
                    self._arm_exact(call_id)
        if crossings:
            self._react(crossings)
        self._unwatch_call(None)

    def forget_scope(self, scope: str) -> None:
        self._memcg_refused.discard(scope)
        self._drop_scope(scope)

    # ---- pure v2: memory.events --------------------------------------------------------
    def _watch_events(self, wanted: list[tuple[str, "str | None", str]]) -> None:
        """(sandbox, call id or None, path): watch each one's memory.events (pure v2 only)."""
        if not self.events_available or not self.enabled:
            return
        for sandbox, call_id, path in wanted:
            key = (sandbox, call_id)
            if key in self._watches:
                continue
            try:
                w = MemoryEventsWatch(self.tree.cgroup_dir(path, "v2"))
            except AgentcgError:
                continue             # gone, or no memory controller there: PSI and the tick cover it
            self._watches[key] = w
            self._register(w.fileno(), select.EPOLLPRI | select.EPOLLERR,
                           lambda fd, mask, key=key, w=w: self._on_events(key, w))

    def _on_events(self, key: tuple[str, "str | None"], w: MemoryEventsWatch) -> None:
        grown = w.changed()
        if grown is None:            # the cgroup went
            self._unwatch(key)
            return
        if grown:
            now = time.monotonic()
            self._react([(key[0], key[1], now, {"source": "memory.events", "scope": "call" if key[1] else "sandbox",
                                                "events": grown, "read_monotonic_s": now})])

    def _unwatch(self, key: tuple[str, "str | None"]) -> None:
        w = self._watches.pop(key, None)
        if w is not None:
            self._unregister(w.fileno())
            w.close()

    def _drop_scope(self, scope: str) -> None:
        for key in [k for k in self._watches if k[0] == scope and k[1] is None]:
            self._unwatch(key)
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
