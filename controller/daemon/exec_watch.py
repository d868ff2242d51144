"""`agentcg sandbox exec` through the daemon: the exec detector runs here, so the commands
an agent starts are the daemon's tool calls (its policy, metrics, records, state).

    sandbox.exec_begin {"sandbox", "tools"?, "exclude"?, "detect"?, "grace_s"?}
        -> {"watch_id", "agent_procs": [cgroup.procs...], "detect"}
    (the client spawns its agent into agent_procs: it joins <sandbox>/agent before exec)
    sandbox.exec_end {"watch_id", "exit_code"? | "signal"?}
        -> {"calls", "missed", "running", "records_path"}

The agent is the first process to exec in `<sandbox>/agent` whose parent is the client
(the peer that sent exec_begin), so the client need not send its pid. Detection uses an
eBPF monitor of its own, with the `process` and `exit_codes` concerns (exit statuses of
commands the agent reaps), loaded at the first exec_begin (one compile, about 1 s, during
which the daemon's loop waits) and closed with the last watch; its ring buffer's epoll fd
sits in the daemon's epoll, so a stopped command is moved and resumed as soon as its exec
event arrives. The detected calls are begun on the daemon's own ToolCallManager, so the
daemon's `finish_due` records them and counts them in /metrics like any other call.

Root only (the client must be able to spawn into the agent cgroup and the detector moves
its processes). A client that dies ends its watch as if the agent exited.

A daemon restart keeps the watches: each is saved in `<state_dir>/exec_watches.json`
(rewritten whole with rename at exec_begin, when the agent's pid becomes known, and at the
watch's end; a clean stop keeps it) and the next daemon re-establishes it at start-up,
before it accepts connections: same watch id, same tools and grace, the agent's pid, the
client's pid and start time (a client gone meanwhile ends its watch at the first
housekeeping pass). Execs the dead daemon's detector had stopped are resumed. So the
agent's later commands are the new daemon's calls, and the client's exec_end goes to it;
the calls already moved are in the daemon's state (owned by the watch's client, entered
once they were resumed), so the next daemon adopts them, and the restored watch tracks
them again until they exit (the earlier daemon's spares are dropped).
Only the exec events of the downtime itself are missed (those commands run in the agent
cgroup). The daemon re-establishes rather than the client re-registering: no window
between the new daemon's start and a client noticing it, and older clients need nothing.
"""
from __future__ import annotations

import ctypes as ct
import logging
import select
from typing import Any, Callable

from agentcg.controller.autodetect import DEFAULT_TOOL_GLOBS, ExecDetector, ToolMatcher, parse_globs
from agentcg.controller.daemon.exec_watch_saved import MAX_WATCHES, SavedWatches, Watch, sigcont as _sigcont
from agentcg.controller.daemon.server import ApiError, Connection, Request
from agentcg.controller.daemon.state import SandboxEntry
from agentcg.controller.sandbox import agent_path, ensure_sandbox, procs_files, sandbox_lock, validate_name
from agentcg.daemon_protocol import MAX_GRACE_S, Method
from agentcg.errors import AgentcgError, BpfError, InvalidInput
from agentcg.procfs import PROC

log = logging.getLogger("agentcg.daemon.exec_watch")
MAX_GLOB_ITEMS = 256
EXEC_CONCERNS = ("process", "exit_codes")


class DaemonExecDetector(ExecDetector):
    """An ExecDetector whose calls the daemon finishes: `finish_due` stays the daemon's, so
    its records, stats and waiters are handled once; this one only notes which are gone."""

    def __init__(self, *args: Any, daemon: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.daemon = daemon
        self.finished = 0

    def _refill(self) -> None:
        super()._refill()
        for spare in self._spares:      # exit events of the moved commands come from this monitor
            if spare.cgroup_id not in self.monitor.watched():
                self.monitor.watch(spare.cgroup_id)

    def _move(self, call: Any, pid: int) -> bool:
        self.daemon.calls.changed(call)     # a spare taken by a command: its tool and start are new
        moved = super()._move(call, pid)
        if moved and self.monitor is not getattr(self.mgr, "monitor", None):
            try:
                self.monitor.watch_pid(pid, call.cgroup_id)
            except AgentcgError:
                pass
        return moved

    def _finish_due(self) -> list:
        running = {c.call_id for c in self.daemon.calls.running()}
        for pid, tracked in list(self._by_pid.items()):
            if tracked.call.call_id not in running:
                del self._by_pid[pid]
                self.finished += 1
                self.forget(tracked.call.cgroup_id)
        return []

    def forget(self, cgroup_id: int) -> None:
        if cgroup_id in self.monitor.watched():
            try:
                self.monitor.forget(cgroup_id)
            except AgentcgError:
                pass


class ExecWatch(SavedWatches):
    """The daemon's exec watches; `ops()` for the API, `on_housekeeping()` from its loop."""

    def __init__(self, daemon: Any, load_monitor: Callable[[], Any] | None = None) -> None:
        self.d = daemon
        self._load_monitor = load_monitor or _load_exec_monitor
        self.monitor: Any = None
        self._ring_fd: int | None = None
        self.watches: dict[int, Watch] = {}
        self._next_id = 1
        self._saved_text: str | None = None

    def ops(self) -> dict[str, Callable[[Connection, Request], Any]]:
        return {Method.SANDBOX_EXEC_BEGIN: self.exec_begin, Method.SANDBOX_EXEC_END: self.exec_end}

    # ---- operations ---------------------------------------------------------------
    def exec_begin(self, conn: Connection, req: Request) -> dict[str, Any]:
        args = _args(req, {"sandbox", "detect", "tools", "exclude", "grace_s"})
        sandbox = args.get("sandbox")
        if not isinstance(sandbox, str):
            raise ApiError("invalid_input", f"{req.op}: 'sandbox' must be a sandbox name, got {sandbox!r}")
        sandbox = validate_name(sandbox)
        detect = args.get("detect", True)
        include, exclude = args.get("tools"), args.get("exclude", [])
        grace_s = _number(req.op, args, "grace_s", 0.0, MAX_GRACE_S)
        if not isinstance(detect, bool):
            raise ApiError("invalid_input", f"{req.op}: 'detect' must be true or false, got {detect!r}")
        matcher = ToolMatcher(_globs(req.op, "tools", include) if include is not None else DEFAULT_TOOL_GLOBS,
                              _globs(req.op, "exclude", exclude))
        if not conn.peer.is_root:
            raise ApiError("forbidden", f"{req.op} is for root only (you are uid {conn.peer.uid}); run "
                                        "`agentcg sandbox exec` as root")
        if len(self.watches) >= MAX_WATCHES:
            raise ApiError("busy", f"{MAX_WATCHES} agents are watched already; end one first")
        created = self._ensure_sandbox(sandbox)
        detector = self._detector(sandbox, matcher, grace_s, conn.peer.pid, 0) if detect else None
        watch = Watch(self._next_id, sandbox, conn.peer.pid, PROC.start_ticks(conn.peer.pid), created, detector,
                      matcher, grace_s, detect)
        self._next_id += 1
        self.watches[watch.watch_id] = watch
        self._save()
        return {"watch_id": watch.watch_id, "detect": detector is not None,
                "agent_procs": [str(p) for p in procs_files(self.d.tree, agent_path(sandbox))]}

    def _ensure_sandbox(self, sandbox: str) -> bool:
        d = self.d
        created = False
        if sandbox not in d.state.sandboxes:
            with sandbox_lock(d.tree, sandbox, d.config.daemon.state_dir):
                created = ensure_sandbox(d.tree, sandbox)
            d.add_sandbox(SandboxEntry(sandbox))
        else:
            with sandbox_lock(d.tree, sandbox, d.config.daemon.state_dir):
                ensure_sandbox(d.tree, sandbox)     # an adopted sandbox may lack agent/
        return created

    def _detector(self, sandbox: str, matcher: ToolMatcher, grace_s: float | None, parent_pid: int,
                  agent_pid: int) -> DaemonExecDetector:
        self._ensure_monitor()
        detector = DaemonExecDetector(self.d.calls, self.monitor, sandbox, agent_pid=agent_pid, matcher=matcher,
                                      parent_pid=parent_pid, grace_s=grace_s, daemon=self.d)
        if agent_pid:
            detector.agent_execs = 1    # the agent started under an earlier daemon: its next exec is a command
        try:
            detector.prepare()
        except BaseException:
            detector.close(grace_s=0.0)
            self._release_monitor()
            raise
        return detector

    def exec_end(self, conn: Connection, req: Request) -> dict[str, Any]:
        args = _args(req, {"watch_id", "exit_code", "signal"})
        watch_id = _integer(req.op, args, "watch_id", 1, 2**62)
        exit_code, signal_number = _integer(req.op, args, "exit_code", 0, 255), _integer(req.op, args, "signal", 1, 64)
        if watch_id is None:
            raise ApiError("invalid_input", f"{req.op}: missing argument 'watch_id'")
        watch = self.watches.get(watch_id)
        if watch is None or watch.ending:
            raise ApiError("not_found", f"no exec watch {watch_id}; it ended already (or the daemon restarted)")
        if not conn.peer.is_root:
            raise ApiError("forbidden", f"{req.op} is for root only")
        returncode = -signal_number if signal_number is not None else exit_code
        self._end(watch, returncode)
        return dict(watch.result)

    # ---- the loop's side ------------------------------------------------------------
    def on_housekeeping(self) -> None:
        if self.monitor is not None:
            # on each pass, fd or not: exec and exit events are submitted without waking the
            # reader (BpfMonitor.fileno), only urgent ones (a stopped exec) wake it at once
            self._on_ring(-1, 0)
        for watch in list(self.watches.values()):
            if not watch.ending and not PROC.is_alive(watch.client_pid, watch.client_ticks):
                log.info("the client of exec watch %d (pid %d) died; its agent's commands are no longer detected",
                         watch.watch_id, watch.client_pid)
                self._end(watch, None)
            elif watch.detector is not None and not watch.ending:
                self._guard(watch.detector.housekeeping)
            if watch.ending:
                self._settle(watch)
        self._save()      # spares refilled (no write when nothing changed)

    def close(self) -> None:
        """Daemon shutdown: stop detecting (the calls stay for the next daemon)."""
        for watch in list(self.watches.values()):
            if watch.detector is not None:
                self._stop_detecting(watch)
        self.watches.clear()
        self._release_monitor(force=True)

    def _on_ring(self, fd: int, mask: int) -> None:
        try:
            events = self.monitor.poll(0)
        except AgentcgError as exc:
            log.error("exec watch eBPF poll: %s", exc)
            return
        detectors = [w.detector for w in self.watches.values() if w.detector is not None and not w.ending]
        try:
            for detector in detectors:
                self._guard(detector.handle, events, resume=False)
        finally:
            for event in events:
                if getattr(event, "stopped", False):    # every stopped exec runs again, whoever handled it
                    _sigcont(event.pid)
        for detector in detectors:
            self._guard(detector.housekeeping)
        self._enter_calls()
        self._save()      # when the agent's pid, the spares or the moved calls changed (else no write)

    # ---- internals ----------------------------------------------------------------
    def _end(self, watch: Watch, returncode: int | None) -> None:
        watch.ending = True
        detector = watch.detector
        if detector is not None:
            if returncode is not None:
                detector.agent_exited(returncode)
            self._stop_detecting(watch)
            for call in detector.tracked_calls():
                self.d.calls.returned(call)          # the daemon finishes them after their grace period
            self.d.finish_due()
        self._save()
        watch.result = {"calls": (detector.finished + len(detector.tracked_calls())) if detector else 0,
                        "missed": detector.missed if detector else 0,
                        "running": len(detector.tracked_calls()) if detector else 0,
                        "records_path": str(self.d.config.records_path) if self.d.config.records_path else None}
        self._settle(watch)

    def _settle(self, watch: Watch) -> None:
        """Drop an ending watch once its calls are finished; remove a sandbox it made."""
        if watch.detector is not None:
            watch.detector._finish_due()
            if watch.detector.tracked_calls():
                return
        self.watches.pop(watch.watch_id, None)
        if watch.created_sandbox and not any(c.sandbox == watch.sandbox for c in self.d.calls.running()):
            try:
                self.d.remove_sandbox(watch.sandbox)   # made for this agent: its leftovers go too
            except AgentcgError as exc:
                log.warning("cannot remove sandbox %s of exec watch %d: %s", watch.sandbox, watch.watch_id, exc)
        self._release_monitor()

    def _stop_detecting(self, watch: Watch) -> None:
        detector = watch.detector
        assert detector is not None
        for spare in detector._spares:
            detector.forget(spare.cgroup_id)
            self._guard(self.d.calls.discard, spare)
        detector._spares.clear()
        if self.monitor is not None and detector.agent_cgroup_id in self.monitor.watched():
            self._guard(self.monitor.forget, detector.agent_cgroup_id)

    def _ensure_monitor(self) -> None:
        if self.monitor is not None:
            return
        try:
            self.monitor = self._load_monitor()
        except AgentcgError as exc:
            raise ApiError("unsupported", f"sandbox.exec_begin: cannot load the exec detector's eBPF programs "
                                          f"({exc}); run `agentcg doctor`, or pass detect=false") from None
        self._ring_fd = _ring_fd(self.monitor)
        if self._ring_fd is not None:
            self.d._register(self._ring_fd, select.EPOLLIN, self._on_ring)

    def _release_monitor(self, force: bool = False) -> None:
        if self.monitor is None or (self.watches and not force):
            return
        if any(w.detector is not None for w in self.watches.values()) and not force:
            return
        if self._ring_fd is not None:
            self.d._unregister(self._ring_fd)
            self._ring_fd = None
        for event in self._guard(self.monitor.poll, 0) or []:
            if getattr(event, "stopped", False):
                _sigcont(event.pid)
        self.monitor.close()
        self.monitor = None

    @staticmethod
    def _guard(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except AgentcgError as exc:   # one agent's trouble must not stop the daemon's loop
            log.error("exec watch: %s", exc)
            return None


def _args(req: Request, known: set[str]) -> dict[str, Any]:
    unknown = sorted(set(req.args) - known)
    if unknown:
        raise ApiError("invalid_input", f"{req.op}: unknown argument(s) {', '.join(unknown)}; "
                                        f"it takes {', '.join(sorted(known))}")
    return req.args


def _integer(op: str, args: dict[str, Any], name: str, low: int, high: int) -> int | None:
    value = args.get(name)
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high):
        raise ApiError("invalid_input", f"{op}: '{name}' must be an integer in {low}..{high}, got {value!r}")
    return value


def _number(op: str, args: dict[str, Any], name: str, low: float, high: float) -> float | None:
    value = args.get(name)
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high):
        raise ApiError("invalid_input", f"{op}: '{name}' must be a number in {low:g}..{high:g}, got {value!r}")
    return None if value is None else float(value)


def _globs(op: str, name: str, value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or len(value) > MAX_GLOB_ITEMS or not all(isinstance(g, str) for g in value):
        raise ApiError("invalid_input", f"{op}: '{name}' must be a list of at most {MAX_GLOB_ITEMS} glob strings")
    try:
        return parse_globs(value)
    except InvalidInput as exc:
        raise ApiError("invalid_input", f"{op}: '{name}': {exc}") from None


def _load_exec_monitor() -> Any:
    from agentcg.bpf.monitor import BpfMonitor
    return BpfMonitor(concerns=EXEC_CONCERNS)


def _ring_fd(monitor: Any) -> int | None:
    """The ring buffer's epoll fd (libbpf ring_buffer__epoll_fd), None where unavailable
    (the events are then read on the daemon's housekeeping pass)."""
    fileno = getattr(monitor, "fileno", None)
    try:
        if fileno is not None:
            return int(fileno())
        from agentcg.bpf.monitor import load_bcc
        manager = getattr(monitor._b, "_ringbuf_manager", None)
        if not manager:
            return None
        lib = load_bcc().libbcc.lib
        lib.ring_buffer__epoll_fd.argtypes = [ct.c_void_p]
        lib.ring_buffer__epoll_fd.restype = ct.c_int
        fd = lib.ring_buffer__epoll_fd(ct.c_void_p(manager))
        return fd if fd >= 0 else None
    except (AttributeError, OSError, BpfError):
        return None
