"""The exec watch inside adopted containers (docs/containers.md, "Tool calls").

Both cgroups of an adopted container (its own, and S/agent) are watched by eBPF with
stop_at_exec: every exec there is stopped by the kernel before its new image runs, and
`on_events` decides:
- an exec in C's own cgroup came from outside: `podman exec` / `docker exec` (runc joins
  the container's cgroup; on cgroup v2 with controllers enabled it joins init's cgroup,
  S/agent, instead) -- always a tool call;
- an exec in S/agent whose parent is outside the container: the same, on v2;
- an exec in S/agent by a direct child of the container's init (the agent), or by init
  itself after its first exec, matching the tool globs (controller/autodetect.py) -- a
  tool call, as `agentcg sandbox exec` does;
- anything else (the agent's grandchildren, runc's own re-exec): left running where it is.
A tool call gets S/tools/<id>, the process (and what it forked before the move) is moved
there, and SIGCONT. Its record carries `extra.host_pid` and `extra.container_pid` (NSpid).
The call's owner is its own main process: when that exits (eBPF exit event, or
`housekeeping` when that event was lost) the call ends and is recorded as every other call.
Runs in the daemon's loop thread only.
"""
from __future__ import annotations

import logging
import math
import os
import time
from typing import Any, Callable

from agentcg.controller.autodetect import _command_of, _continue   # the SIGCONT of a process stopped at exec
from agentcg.controller.container import ns_pids
from agentcg.controller.container_nest import AGENT
from agentcg.controller.container_state import PROC, Adopted
from agentcg.controller.daemon.state import CallEntry
from agentcg.errors import AgentcgError, CgroupGone, InvalidInput
from agentcg.records import truncate_command

log = logging.getLogger("agentcg.daemon.containers")

ALIVE_CHECK_S = 0.25
FORGOTTEN_KEPT_S = 5.0          # a released container's stopped execs may still be in the ring buffer
LOST_EXIT_S = 0.5               # a command gone this long without its exit event: status unknown
_RUNC_NAMES = ("runc", "runc:[", "runc-dmz", "crun", "conmon")


class MonitorTap:
    """The daemon's BpfMonitor, with every batch `poll` returns shown to a listener first
    (the adopted containers' execs and exits), whoever drains the ring buffer."""

    def __init__(self, monitor: Any, listener: Any) -> None:
        self._monitor, self._listener = monitor, listener

    def poll(self, timeout_s: float = 0.0) -> list[Any]:
        events = self._monitor.poll(timeout_s)
        sandboxes = self._listener()
        if sandboxes is not None and events:
            try:
                sandboxes.on_events(events)
            except Exception:   # a bug here must not cost the daemon its events
                log.exception("adopted containers: handling %d eBPF events", len(events))
        return events

    def __getattr__(self, name: str) -> Any:
        return getattr(self._monitor, name)


class ContainerExecs:
    """Which cgroups are watched for which container, and which process is which call's."""

    def __init__(self, daemon: Any, save: Callable[[], None]) -> None:
        """`daemon`: the Daemon (its calls, state, monitor, config); `save`: writes the
        adopted containers' state file (their running calls' main processes)."""
        self.d = daemon
        self._save = save
        self._by_cgroup: dict[int, Adopted] = {}
        self._by_pid: dict[int, str] = {}          # main pid -> call id
        self._dead_since: dict[int, float] = {}    # main pid gone, its exit event not seen yet
        self._stopping: dict[int, float] = {}      # cgroup ids watched with stop_at_exec (and lately forgotten)
        self._next_check = 0.0

    # ---- which cgroups are watched ------------------------------------------------------
    def watch_root(self, entry: Adopted) -> None:
        """Watch the container's own cgroup (before its processes move: an exec right
        after the move is caught)."""
        if self.d.monitor is not None:
            self.d.monitor.watch(entry.root_id, stop_at_exec=True)
            self._stopping[entry.root_id] = math.inf

    def watch(self, entry: Adopted) -> None:
        """Watch S/agent too, and know both cgroups as `entry`'s."""
        if self.d.monitor is not None:
            self.d.monitor.watch(entry.agent_id, stop_at_exec=True)
            self._stopping.update({entry.root_id: math.inf, entry.agent_id: math.inf})
        self._by_cgroup[entry.root_id] = entry
        self._by_cgroup[entry.agent_id] = entry

    def forget(self, entry: Adopted) -> None:
        """Stop watching `entry`'s cgroups; execs already in the ring buffer still get
        their SIGCONT for FORGOTTEN_KEPT_S."""
        monitor = self.d.monitor
        for cgroup_id in (entry.root_id, entry.agent_id):
            self._by_cgroup.pop(cgroup_id, None)
            if monitor is not None and cgroup_id in monitor.watched():
                monitor.forget(cgroup_id)
            if cgroup_id in self._stopping:
                self._stopping[cgroup_id] = time.monotonic() + FORGOTTEN_KEPT_S

    def forget_call(self, call_id: str) -> None:
        self._by_pid = {p: c for p, c in self._by_pid.items() if c != call_id}

    @property
    def idle(self) -> bool:
        return not (self._by_cgroup or self._by_pid or self._stopping)

    # ---- the loop -----------------------------------------------------------------------
    def on_events(self, events: list[Any]) -> None:
        """Exec and exit events from the daemon's ring-buffer drain."""
        from agentcg.bpf.events import ExecEvent, ExitEvent

        if self.idle:
            return
        for event in events:
            if isinstance(event, ExecEvent):
                entry = self._by_cgroup.get(event.cgroup_id)
                continued = False
                try:
                    if entry is not None:
                        continued = self._on_exec(entry, event)
                except Exception:   # a bug must not leave the command stopped
                    log.exception("container exec of %s in %s", event.filename, entry.name if entry else "?")
                finally:
                    if not continued and event.cgroup_id in self._stopping:
                        _continue(event)   # only what our stop_at_exec watches stopped
            elif isinstance(event, ExitEvent):
                call_id = self._by_pid.pop(event.pid, None)
                self._dead_since.pop(event.pid, None)
                if call_id is not None:
                    try:
                        call = self.d.calls.get(call_id)
                    except CgroupGone:
                        continue
                    self.d.end_call(call, event.exit_code, event.signal, waiter=None)

    def housekeeping(self, now: float) -> bool:
        """Every ALIVE_CHECK_S: end the calls whose exit event was lost. True when it was
        time (the caller checks its containers then too)."""
        if now < self._next_check or self.idle:
            return False
        self._next_check = now + ALIVE_CHECK_S
        for cgroup_id in [c for c, until in self._stopping.items() if until < now]:
            del self._stopping[cgroup_id]
        for pid, call_id in list(self._by_pid.items()):
            if PROC.is_alive(pid):
                continue
            since = self._dead_since.setdefault(pid, now)
            if now - since >= LOST_EXIT_S:       # its exit event was lost: status unknown
                self._by_pid.pop(pid, None)
                self._dead_since.pop(pid, None)
                try:
                    self.d.end_call(self.d.calls.get(call_id), None, None, waiter=None)
                except CgroupGone:
                    pass
        return True

    def _on_exec(self, entry: Adopted, event: Any) -> bool:
        """Handle one exec; True when the process was sent its SIGCONT already."""
        pid, filename = event.pid, event.filename
        base = os.path.basename(filename)
        if base.startswith(_RUNC_NAMES) or filename.startswith(("/proc/self/", "memfd:")):
            return False
        ppid = event.ppid or _ppid(pid)
        # From outside: its parent is not in the container (runc, for `podman exec`). A
        # process the container forked itself may still exec in the container's cgroup
        # while adoption moves the others: it is the agent's and joins agent/.
        from_outside = not _inside(entry, ppid)
        if not from_outside and (pid == entry.init_pid or ppid == entry.init_pid) \
                and entry.matcher.matches(filename):
            return self._begin(entry, event, False)
        if from_outside:
            return self._begin(entry, event, True)
        if event.cgroup_id == entry.root_id:
            try:
                entry.tree.attach(AGENT, pid)
            except AgentcgError:
                pass   # exited meanwhile
        return False

    def _begin(self, entry: Adopted, event: Any, from_outside: bool) -> bool:
        """The exec becomes a call: cgroup, move, SIGCONT, then the bookkeeping (the
        command waits stopped only for what it must: its cgroup and the move)."""
        d, pid = self.d, event.pid
        if len(d.calls.running()) >= d.config.limits.max_running_calls:
            log.warning("%s: max_running_calls reached; %s runs untracked", entry.name, event.filename)
            return False
        tool = os.path.basename(event.filename) or event.comm or "unknown"
        call = d.calls.begin(entry.name, tool[:64], truncate_command(_command_of(pid, event.filename)),
                             create_sandbox=False)
        call.start_monotonic_s = event.monotonic_s
        call.start_wall_s = time.time() - (time.monotonic() - event.monotonic_s)
        source = "" if event.cgroup_id == entry.root_id else AGENT
        try:
            d.apply_call_limits(call)
            call.attach(pid)
            moved = True
        except (CgroupGone, AgentcgError):
            moved = False
        if moved:
            if d.monitor is not None:
                try:
                    d.monitor.watch_pid(pid, call.cgroup_id)
                except InvalidInput:
                    pass
            if not getattr(event, "stopped", False):   # it ran meanwhile, and may have forked
                _move_children(entry, call, source, pid)
        host_pid, container_pid = ns_pids(pid)
        start_ticks = PROC.start_ticks(pid) if moved else None
        call.extra.update({"host_pid": host_pid, "container_pid": container_pid, "from_exec": 1 if from_outside else 0,
                           "detect_latency_s": time.monotonic() - event.monotonic_s})
        _continue(event)
        if entry.container_id:
            call.extra["container_id"] = entry.container_id[:12]   # type: ignore[assignment]
        d.state.calls[call.call_id] = CallEntry(
            call_id=call.call_id, sandbox=entry.name, tool=call.tool, command=call.command,
            start_monotonic_s=call.start_monotonic_s, start_wall_s=call.start_wall_s, grace_s=call.grace_s,
            # no owner for the daemon's owner check: its end comes from the eBPF exit event (with
            # the status), or from housekeeping when that event was lost; after a restart the
            # call is ended once its cgroup is empty
            owner_pid=0)
        d.save()
        d.engine_tool_began(call)
        if moved:
            self._by_pid[pid] = call.call_id
            self._dead_since.pop(pid, None)
            entry.calls[call.call_id] = (pid, start_ticks or 0)
            self._save()
        else:
            call.measured = False
            d.end_call(call, None, None, waiter=None)
        return True


def _inside(entry: Adopted, pid: int | None) -> bool:
    """True when `pid` lives in the container's cgroup or below it."""
    if not pid:
        return False
    try:
        path = (PROC.v2_cgroup(pid) or "").strip("/")
    except AgentcgError:
        return False
    return path == entry.cgroup.v2 or path.startswith(entry.cgroup.v2 + "/")


def _move_children(entry: Adopted, call: Any, source: str, pid: int) -> None:
    """What the command forked between its exec and the move is still in `source`."""
    family = {pid}
    for _ in range(8):
        try:
            pids = entry.tree.pids(source)
        except CgroupGone:
            return
        found = [p for p in pids if p != entry.init_pid and _ppid(p) in family]
        for p in found:
            try:
                call.attach(p)
                family.add(p)
            except AgentcgError:
                pass
        if not found:
            return


def _ppid(pid: int) -> int | None:
    try:
        return PROC.stat(pid).ppid
    except AgentcgError:
        return None
