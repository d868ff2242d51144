"""Automatic tool calls: every command an agent starts becomes a tool call, seen by eBPF.

`agentcg sandbox exec S -- CMD` spawns CMD (the agent, pid P) into `<S>/agent`, watches
that cgroup, and reads exec events from the BPF ring buffer. An exec in the agent cgroup
is a tool call when its program's basename matches the configured globs and either
- its parent is P (a command the agent started as a direct child), or
- it is P itself, after P's first exec: bash runs the LAST command of a `-c` list (and
  the only command of `bash -c 'cmd'`) by exec-ing it in its own process, without a fork
  (bash 5.2 does this), so `bash -c 'ls; python3 x.py; sleep 1'` has two children and
  then becomes `sleep` itself.
The kernel stops (SIGSTOP, from the exec tracepoint) every process that execs in the agent
cgroup before its new image runs an instruction; user space moves it into a fresh
`<S>/tools/<call-id>` (a spare cgroup is kept ready, so the move is only writes of the pid)
and sends SIGCONT, so even a command that would exit within microseconds runs entirely in
its own cgroup. Non-interactive waiters (a shell without job control, Python's wait) do not
see the stop. If the move fails anyway (the process vanished), the call still gets a record
(times and exit status from eBPF) with its resource fields None and `message` saying why.
"""
from __future__ import annotations

import fnmatch
import os
import signal
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Sequence

from agentcg.controller.sandbox import agent_path
from agentcg.controller.toolcall import ToolCall, ToolCallManager
from agentcg.errors import AgentcgError, CgroupGone, InvalidInput, ProcessGone
from agentcg.procfs import PROC
from agentcg.records import ToolCallRecord, truncate_command

if TYPE_CHECKING:
    from agentcg.bpf.monitor import BpfMonitor

SHELLS = ("sh", "bash", "dash", "zsh", "ksh", "fish", "busybox")
DEV_TOOLS = (
    "python", "python3", "python3.*", "pip", "pip3", "uv", "node", "npm", "npx", "yarn", "pnpm", "deno", "bun",
    "git", "make", "cmake", "ninja", "gcc", "g++", "cc", "c++", "clang", "clang++", "ld", "cargo", "rustc", "go",
    "java", "javac", "mvn", "gradle", "pytest", "ruff", "mypy", "black", "tsc", "eslint", "docker", "podman",
    "curl", "wget", "rg", "grep", "egrep", "fgrep", "sed", "awk", "gawk", "mawk", "find", "xargs", "jq",
    "tar", "gzip", "gunzip", "zip", "unzip", "xz", "patch", "diff", "file", "which", "timeout", "strace",
)
COREUTILS = (
    "ls", "cat", "sleep", "echo", "printf", "cp", "mv", "rm", "mkdir", "rmdir", "touch", "ln", "chmod", "chown",
    "head", "tail", "wc", "sort", "uniq", "cut", "tr", "tee", "du", "df", "stat", "date", "env", "true", "false",
    "test", "[", "seq", "yes", "pwd", "id", "uname", "basename", "dirname", "realpath", "readlink", "md5sum",
    "sha1sum", "sha256sum", "nproc", "nl", "od", "paste", "split", "comm", "join", "fold", "expand", "shuf",
    "mktemp", "install", "dd", "truncate", "sync", "whoami", "hostname", "kill", "ps",
)
DEFAULT_TOOL_GLOBS: tuple[str, ...] = SHELLS + DEV_TOOLS + COREUTILS
MAX_GLOBS = 256
MAX_GLOB_CHARS = 128
POLL_S = 0.05
SPARE_CALLS = 2
MAX_DESCENDANT_ROUNDS = 8
LOST_EXIT_S = 0.5              # a command gone this long without its exit event: status unknown


def parse_globs(text: str | Sequence[str]) -> tuple[str, ...]:
    """'pytest,make,python3*' (or a list) -> globs on program basenames; InvalidInput when malformed."""
    items = [g.strip() for g in (text.split(",") if isinstance(text, str) else text)]
    items = [g for g in items if g]
    if len(items) > MAX_GLOBS:
        raise InvalidInput(f"at most {MAX_GLOBS} globs, got {len(items)}")
    for glob in items:
        if "/" in glob or len(glob) > MAX_GLOB_CHARS or not glob.isprintable():
            raise InvalidInput(f"bad glob {glob!r}: match program basenames (no '/'), up to {MAX_GLOB_CHARS} characters")
    return tuple(items)


@dataclass(frozen=True)
class ToolMatcher:
    """Which programs count as tool calls: basename matches `include` and not `exclude`."""

    include: tuple[str, ...] = DEFAULT_TOOL_GLOBS
    exclude: tuple[str, ...] = ()

    def matches(self, filename: str) -> bool:
        name = os.path.basename(filename)
        if any(fnmatch.fnmatchcase(name, g) for g in self.exclude):
            return False
        return any(fnmatch.fnmatchcase(name, g) for g in self.include)


@dataclass
class _Tracked:
    call: ToolCall
    pid: int
    moved: bool
    dead_since_s: float | None = None


class ExecDetector:
    """Turns exec events in one sandbox's agent cgroup into tool calls. Single-threaded:
    call `step()` from one loop (it polls the monitor, which it must be the only reader of),
    or, where another loop reads the monitor (the daemon, controller/daemon/exec_watch.py),
    pass each batch to `handle()` and call `housekeeping()` now and then.

    `agent_pid` 0 with a `parent_pid`: the agent is the first process to exec in the agent
    cgroup whose parent is `parent_pid` (the client that spawned it, when the daemon
    detects for a client that cannot tell the pid before the agent runs)."""

    def __init__(self, mgr: ToolCallManager, monitor: "BpfMonitor", sandbox: str, agent_pid: int,
                 matcher: ToolMatcher = ToolMatcher(), on_record: Callable[[ToolCallRecord], None] | None = None,
                 parent_pid: int | None = None, grace_s: float | None = None):
        self.mgr = mgr
        self.monitor = monitor
        self.sandbox = sandbox
        self.agent_pid = agent_pid
        self.parent_pid = parent_pid
        self.grace_s = grace_s        # for the calls it begins (None: the manager's)
        self.matcher = matcher
        self.on_record = on_record
        self.agent_cgroup_id = mgr.tree.cgroup_id(agent_path(sandbox))
        self.agent_execs = 0
        self.records: list[ToolCallRecord] = []
        self.missed = 0               # commands that exited before they could be moved
        self._by_pid: dict[int, _Tracked] = {}
        self._spares: list[ToolCall] = []

    def prepare(self) -> None:
        """Watch the agent cgroup (before spawning the agent) and create the spare call cgroups."""
        self.monitor.watch(self.agent_cgroup_id, stop_at_exec=True)
        self._refill()

    def _refill(self) -> None:
        while len(self._spares) < SPARE_CALLS:
            self._spares.append(self.mgr.begin(self.sandbox, "pending", "", create_sandbox=False, grace_s=self.grace_s))

    def step(self, timeout_s: float = POLL_S) -> list[ToolCallRecord]:
        """Handle the events that arrive within `timeout_s`; return the records finished."""
        self.handle(self.monitor.poll(timeout_s))
        return self.housekeeping()

    def handle(self, events: Sequence[object], *, resume: bool = True) -> None:
        """Exec and exit events (from whoever reads the monitor). `resume`: SIGCONT the
        processes stopped at exec once handled (off when several detectors see a batch)."""
        from agentcg.bpf.events import ExecEvent, ExitEvent

        for event in events:
            if isinstance(event, ExecEvent):
                try:
                    self._on_exec(event)
                finally:
                    if resume:
                        _continue(event)
            elif isinstance(event, ExitEvent):
                self._on_exit(event)

    def housekeeping(self) -> list[ToolCallRecord]:
        """Refill spares, give up on commands whose exit was lost, collect finished calls."""
        self._refill()   # after the batch: making a cgroup must not delay the next move
        now = time.monotonic()
        for tracked in self._by_pid.values():
            if tracked.moved or tracked.call.has_returned or _alive(tracked.pid):
                continue
            if tracked.dead_since_s is None:
                tracked.dead_since_s = now
            elif now - tracked.dead_since_s >= LOST_EXIT_S:
                self.mgr.returned(tracked.call)   # its exit event was lost: status unknown
        return self._finish_due()

    def agent_exited(self, returncode: int) -> None:
        """The agent process P was reaped by its spawner: its call (if P became one) returned."""
        from agentcg.records import status_of

        tracked = self._by_pid.get(self.agent_pid)
        if tracked is not None:
            self.mgr.returned(tracked.call, *status_of(returncode))

    def close(self, grace_s: float | None = None) -> list[ToolCallRecord]:
        """End every call (grace period, then kill), drop the spares, stop watching the agent."""
        self.step(0)
        for tracked in list(self._by_pid.values()):
            if not _alive(tracked.pid):
                self.mgr.returned(tracked.call)
        deadline = time.monotonic() + (self.mgr.grace_s if grace_s is None else grace_s)
        while self._by_pid and time.monotonic() < deadline:
            self.step(0.01)
            for tracked in list(self._by_pid.values()):
                if not _alive(tracked.pid):
                    self.mgr.returned(tracked.call)
        for tracked in list(self._by_pid.values()):
            self.mgr.returned(tracked.call)
            tracked.call.grace_s = 0.0
        records = self._finish_due()
        for spare in self._spares:
            self.mgr.discard(spare)
        self._spares.clear()
        if self.agent_cgroup_id in self.monitor.watched():
            self.monitor.forget(self.agent_cgroup_id)
        for event in self.monitor.poll(0):   # execs stopped before the forget: let them run
            _continue(event)
        return records

    # ---- events -------------------------------------------------------------------
    def _on_exec(self, event) -> None:
        if event.cgroup_id != self.agent_cgroup_id:
            return
        if self.agent_pid == 0 and self.parent_pid:
            # the spawner forked outside any watched cgroup, so the event's ppid is 0: ask
            # /proc (the process is stopped at its exec, so it is there)
            if _ppid(event.pid) != self.parent_pid:
                return       # nothing counts before the agent is known
            self.agent_pid = event.pid   # the spawner's child: the agent starting
        if event.pid == self.agent_pid:
            self.agent_execs += 1
            if self.agent_execs == 1:
                return   # the agent itself starting
        elif event.ppid != self.agent_pid:
            return       # a grandchild of the agent: it belongs to the agent's own work
        if not self.matcher.matches(event.filename) or event.pid in self._by_pid:
            return
        if not self._spares:
            self._refill()
        call = self._spares.pop(0)
        call.tool = os.path.basename(event.filename) or event.comm
        call.command = truncate_command(_command_of(event.pid, event.filename))
        # the call starts at the exec, not when its spare cgroup was made
        call.start_monotonic_s = event.monotonic_s
        call.start_wall_s = time.time() - (time.monotonic() - event.monotonic_s)
        moved = self._move(call, event.pid)
        call.extra["detect_latency_s"] = time.monotonic() - event.monotonic_s
        if not moved:
            self.missed += 1
            call.measured = False
        self._by_pid[event.pid] = _Tracked(call, event.pid, moved)

    def _move(self, call: ToolCall, pid: int) -> bool:
        try:
            call.attach(pid)
        except (CgroupGone, AgentcgError):
            return False   # exited (or is exiting) already
        # the monitor that watches the call's cgroup (the manager's) tracks its tasks
        counters = getattr(self.mgr, "monitor", None) or self.monitor
        try:
            counters.watch_pid(pid, call.cgroup_id)
        except (InvalidInput, AgentcgError):
            pass
        self._move_descendants(call, pid)
        return True

    def _move_descendants(self, call: ToolCall, pid: int) -> None:
        """Children the command forked between its exec and the move are still in the agent
        cgroup: move them too (bounded rounds; each round re-reads the agent's pids)."""
        agent = agent_path(self.sandbox)
        family = {pid}
        for _ in range(MAX_DESCENDANT_ROUNDS):
            moved = False
            try:
                pids = self.mgr.tree.pids(agent)
            except CgroupGone:
                return
            for candidate in pids:
                if candidate != self.agent_pid and _ppid(candidate) in family:
                    try:
                        call.attach(candidate)
                        family.add(candidate)
                        moved = True
                    except AgentcgError:
                        pass
            if not moved:
                return

    def _on_exit(self, event) -> None:
        tracked = self._by_pid.get(event.pid)
        if tracked is not None and event.pid != self.agent_pid:
            self.mgr.returned(tracked.call, event.exit_code, event.signal, at_monotonic_s=event.monotonic_s)

    def _finish_due(self) -> list[ToolCallRecord]:
        return self._collect(self.mgr.finish_due())

    def tracked_calls(self) -> list[ToolCall]:
        return [t.call for t in self._by_pid.values()]

    def _collect(self, records: Sequence[ToolCallRecord]) -> list[ToolCallRecord]:
        done = []
        finished = {r.call_id: r for r in records}
        for pid, tracked in list(self._by_pid.items()):
            record = finished.pop(tracked.call.call_id, None)
            if record is not None:
                del self._by_pid[pid]
                self.records.append(record)
                done.append(record)
                if self.on_record is not None:
                    self.on_record(record)
        return done


def _continue(event) -> None:
    """SIGCONT a process the kernel stopped at exec (see WATCH_STOP_AT_EXEC)."""
    if getattr(event, "stopped", False):
        try:
            os.kill(event.pid, signal.SIGCONT)
        except ProcessLookupError:
            pass


def _alive(pid: int) -> bool:
    return PROC.is_alive(pid)


def _ppid(pid: int) -> int | None:
    try:
        return PROC.stat(pid).ppid
    except ProcessGone:
        return None


def _command_of(pid: int, filename: str) -> str:
    """The command line from /proc (arguments joined by spaces), else the exec'd filename."""
    try:
        return " ".join(PROC.cmdline(pid)) or filename
    except ProcessGone:
        return filename
