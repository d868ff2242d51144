"""Tool calls from Python: `Client` and `Call`, in daemon or local mode (the public face
is `agentcg.client`, which re-exports these; see its docstring for examples).

Two modes behind one API (`Client(mode="auto")` picks):
- daemon: the agentcg daemon's Unix socket exists ($AGENTCG_SOCKET, else
  /run/agentcg/agentcg.sock); the client speaks docs/daemon-protocol.md through
  `daemon_client.DaemonLink` (toolcall.begin returns the cgroup.procs files the child joins
  before exec; toolcall.end returns the record). A daemon that restarts while the command
  runs is waited for (bounded, said once on stderr): `toolcall.end` goes to whichever
  daemon is up, which adopted the call, so the command's status is never lost. When no
  daemon comes back in time, or the call was already ended by the daemon, `finish()` still
  returns a record, built here from what the client knows and marked `extra.unconfirmed`;
  the daemon's records file has the measured one (or the next daemon writes it).
  `toolcall.begin` carries a random `request_key`, so a begin whose answer was lost
  (daemon killed meanwhile) is resent with the same back-off: the daemon that has the
  call (the same one, or the next, which adopted it) answers with it, never a second.
  `grace_s` goes to the daemon with `toolcall.begin`; `records_path` gets the daemon's
  record appended, as in local mode.
- local: no socket and we are root; the client drives a ToolCallManager in this process
  (and loads the eBPF programs once, unless ebpf=False), reaping orphans of dead owners first.
"""
from __future__ import annotations

import contextlib
import os
import secrets
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from agentcg.controller.cgroup.spawner import helper_path, spawn_with_fds
from agentcg.controller.daemon_client import DaemonLink, socket_path
from agentcg.daemon_protocol import END_TIMEOUT_S, MAX_GRACE_S, MAX_MESSAGE_BYTES, REQUEST_TIMEOUT_S, Method
from agentcg.errors import (
    AccessDenied, AgentcgError, CgroupGone, DaemonUnavailable, HostUnsupported, InvalidInput, ProtocolError,
)
from agentcg.records import ToolCallRecord, append_record, status_of, truncate_command

MODES = ("auto", "daemon", "local")
__all__ = ["Call", "CallResult", "Client", "MAX_MESSAGE_BYTES", "socket_path", "spawn_into"]


@dataclass(frozen=True)
class CallResult:
    returncode: int              # Popen style: negative = killed by that signal
    record: ToolCallRecord


class Call:
    """One tool call begun through a Client. Spawn into it, then `finish()` (the context
    manager does it); `record` is set once it is finished."""

    def __init__(self, client: "Client", call_id: str, cgroup_id: int, procs_files: list[Path],
                 spawn: Callable[..., subprocess.Popen], finish: Callable[[int | None, int | None], ToolCallRecord]):
        self.client = client
        self.call_id = call_id
        self.cgroup_id = cgroup_id
        self.procs_files = procs_files
        self._spawn = spawn
        self._finish = finish
        self.processes: list[subprocess.Popen] = []
        self.record: ToolCallRecord | None = None

    def spawn(self, argv: Sequence[str], **popen_kwargs: Any) -> subprocess.Popen:
        """Start argv inside the call's cgroup (it joins before exec)."""
        if self.record is not None:
            raise InvalidInput(f"tool call {self.call_id} has finished; begin a new one")
        proc = self._spawn(argv, **popen_kwargs)
        self.processes.append(proc)
        return proc

    def finish(self, exit_code: int | None = None, signal: int | None = None) -> ToolCallRecord:
        """End the call: background processes get the grace period, then the record.
        Without a status, the first spawned process's status is used if it has exited."""
        if self.record is not None:
            return self.record
        if exit_code is None and signal is None and self.processes:
            returncode = self.processes[0].poll()
            if returncode is not None:
                exit_code, signal = status_of(returncode)
        self.record = self._finish(exit_code, signal)
        return self.record


class Client:
    """Talks to the daemon, or drives a ToolCallManager in-process (see the module doc)."""

    def __init__(self, *, mode: str = "auto", socket: str | os.PathLike | None = None, root: str | None = None,
                 state: str | os.PathLike | None = None, records_path: str | os.PathLike | None = None,
                 ebpf: bool = True, grace_s: float | None = None, reconnect_s: float | None = None) -> None:
        if mode not in MODES:
            raise InvalidInput(f"client mode must be one of {', '.join(MODES)}, got {mode!r}")
        self.socket_path = Path(socket) if socket is not None else socket_path()
        if mode == "auto":
            if self.socket_path.exists():
                mode = "daemon"
            elif os.geteuid() == 0:
                mode = "local"
            else:
                raise HostUnsupported(
                    f"no agentcg daemon at {self.socket_path} and not root: start `agentcg daemon` "
                    "(or set AGENTCG_SOCKET), or run as root for local mode")
        self.mode = mode
        self.root = root or os.environ.get("AGENTCG_ROOT") or "agentcg"
        self.state = Path(state) if state is not None else None
        self.records_path = Path(records_path) if records_path is not None else None
        self.ebpf = ebpf
        if grace_s is not None and (isinstance(grace_s, bool) or not 0 <= grace_s <= MAX_GRACE_S):
            raise InvalidInput(f"grace period must be 0..{MAX_GRACE_S:g} seconds, got {grace_s!r}")
        self.grace_s = grace_s
        self._lock = threading.Lock()
        self._manager: Any = None
        self._monitor: Any = None
        self._link = DaemonLink(self.socket_path, reconnect_s=reconnect_s) if mode == "daemon" else None

    # ---- the API ---------------------------------------------------------------------
    def begin(self, sandbox: str, tool: str | None = None, command: Sequence[str] | str | None = None, *,
              mem_hint_bytes: int | None = None, priority: str = "normal") -> Call:
        command = command if command is not None else (tool or "")
        if self.mode == "local":
            return self._begin_local(sandbox, tool, command, mem_hint_bytes, priority)
        return self._begin_daemon(sandbox, tool, command, mem_hint_bytes, priority)

    @contextlib.contextmanager
    def tool_call(self, sandbox: str, tool: str | None = None, command: Sequence[str] | str | None = None, *,
                  mem_hint_bytes: int | None = None, priority: str = "normal") -> Iterator[Call]:
        call = self.begin(sandbox, tool, command, mem_hint_bytes=mem_hint_bytes, priority=priority)
        try:
            yield call
        finally:
            call.finish()

    def run(self, sandbox: str, argv: Sequence[str], *, tool: str | None = None, mem_hint_bytes: int | None = None,
            priority: str = "normal", timeout_s: float | None = None, **popen_kwargs: Any) -> CallResult:
        """Run argv as one tool call and wait for it. A program that does not exist gives
        returncode 127 (as a shell would) and still a record."""
        if isinstance(argv, (str, bytes)) or not argv:
            raise InvalidInput(f"argv must be a non-empty list such as ['ls', '-l'], got {argv!r}")
        call = self.begin(sandbox, tool, list(argv), mem_hint_bytes=mem_hint_bytes, priority=priority)
        returncode = 127
        try:
            try:
                proc = call.spawn(list(argv), **popen_kwargs)
            except (FileNotFoundError, PermissionError, NotADirectoryError) as exc:
                returncode = 126 if isinstance(exc, PermissionError) else 127
            else:
                try:
                    returncode = proc.wait(timeout=timeout_s)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    returncode = proc.wait()
                except BaseException:
                    proc.kill()
                    returncode = proc.wait()
                    raise
        finally:
            record = call.finish(*status_of(returncode))
        return CallResult(returncode, record)

    def close(self) -> None:
        with self._lock:
            if self._manager is not None:
                self._manager.close()
                self._manager = None
            if self._monitor is not None:
                self._monitor.close()
                self._monitor = None
            if self._link is not None:
                self._link.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- local mode -----------------------------------------------------------------
    def manager(self) -> Any:
        """The in-process ToolCallManager (local mode), created at first use."""
        with self._lock:
            if self._manager is None:
                from agentcg.controller.cgroup import open_tree
                from agentcg.controller.reaper import reap_orphans
                from agentcg.controller.toolcall import DEFAULT_GRACE_S, ToolCallManager
                from agentcg.controller.toolcall_pool import DEFAULT_POOL_SIZE

                tree = open_tree(root=self.root)
                reap_orphans(tree, self.state)
                if self.ebpf:
                    from agentcg.bpf.monitor import BpfMonitor
                    self._monitor = BpfMonitor()
                self._manager = ToolCallManager(
                    tree, monitor=self._monitor, records_path=self.records_path,
                    grace_s=DEFAULT_GRACE_S if self.grace_s is None else self.grace_s, state=self.state,
                    pool_size=DEFAULT_POOL_SIZE)   # spare cgroups, and removal in the background
            return self._manager

    def _begin_local(self, sandbox: str, tool: str | None, command: Sequence[str] | str,
                     mem_hint_bytes: int | None, priority: str) -> Call:
        mgr = self.manager()
        tc = mgr.begin(sandbox, tool, command, mem_hint_bytes=mem_hint_bytes, priority=priority)

        def finish(exit_code: int | None, signal: int | None) -> ToolCallRecord:
            record = mgr.end(tc, exit_code, signal)
            if self._monitor is not None:
                self._monitor.poll(0)   # drain exec/exit events nobody here reads
            return record

        return Call(self, tc.call_id, tc.cgroup_id, tc.procs_files, tc.spawn, finish)

    # ---- daemon mode ------------------------------------------------------------------
    def request(self, op: str, args: dict[str, Any] | None = None, *, retry: str = "none") -> dict[str, Any]:
        """One daemon request; the result object, or the mapped agentcg error. `retry`:
        "unsent" waits out a daemon restart before the request reached one, "any" also
        resends after a broken connection (for requests that may be repeated)."""
        if self._link is None:
            raise InvalidInput(f"{op}: this client is in {self.mode} mode; requests need mode='daemon'")
        timeout_s = END_TIMEOUT_S if op == Method.TOOLCALL_END else REQUEST_TIMEOUT_S
        return self._link.request(op, args or {}, timeout_s=timeout_s, retry=retry)

    def _begin_daemon(self, sandbox: str, tool: str | None, command: Sequence[str] | str,
                      mem_hint_bytes: int | None, priority: str) -> Call:
        tool = tool or _program(command)
        command_text = truncate_command(command if isinstance(command, str) else list(command))
        args: dict[str, Any] = {"sandbox": sandbox, "tool": tool, "command": command_text, "priority": priority}
        if mem_hint_bytes is not None:
            args["mem_hint_bytes"] = mem_hint_bytes
        if self.grace_s is not None:
            args["grace_s"] = self.grace_s
        start_monotonic_s, start_wall_s = time.monotonic(), time.time()
        # the key makes a resent begin answer with the same call (docs/daemon-protocol.md),
        # so a begin lost in a daemon restart is sent again to the next daemon
        args["request_key"] = secrets.token_urlsafe(16)
        try:
            result = self.request(Method.TOOLCALL_BEGIN, args, retry="any")
        except InvalidInput as exc:
            if "request_key" not in str(exc):
                raise
            del args["request_key"]    # a daemon older than the key: a begin that reached it is not resent
            result = self.request(Method.TOOLCALL_BEGIN, args, retry="unsent")
        try:
            call_id = str(result["call_id"])
            procs = [Path(p) for p in result["cgroup_procs"]]
            cgroup_id = int(result["cgroup_id"])
        except (KeyError, TypeError, ValueError):
            raise ProtocolError(f"toolcall.begin: the daemon's result lacks call_id/cgroup_procs/cgroup_id: {result!r}") from None

        def finish(exit_code: int | None, signal: int | None) -> ToolCallRecord:
            end_args: dict[str, Any] = {"call_id": call_id}
            if exit_code is not None:
                end_args["exit_code"] = exit_code
            if signal is not None:
                end_args["signal"] = signal
            try:
                # whichever daemon is up ends it: a restarted one adopted the call
                record = ToolCallRecord.from_dict(self.request(Method.TOOLCALL_END, end_args, retry="any").get("record"))
            except (CgroupGone, DaemonUnavailable) as exc:
                unconfirmed = ToolCallRecord(
                    sandbox=sandbox, call_id=call_id, tool=tool, command=command_text,
                    start_monotonic_s=start_monotonic_s, start_wall_s=start_wall_s, end_monotonic_s=time.monotonic(),
                    end_wall_s=time.time(), exit_code=exit_code, signal=signal, priority=priority,
                    mem_hint_bytes=mem_hint_bytes, message=_unconfirmed_message(exc),
                    extra={"unconfirmed": True})
                return unconfirmed    # not appended: the daemon's records file holds (or will hold) this call
            if self.records_path is not None:
                append_record(self.records_path, record)
            return record

        def spawn(argv: Sequence[str], **kw: Any) -> subprocess.Popen:
            proc = spawn_into(procs, argv, **kw)
            if result.get("attach_needed"):   # v1 hierarchies: only the daemon may move it there
                try:
                    self.request(Method.TOOLCALL_ATTACH, {"call_id": call_id, "pid": proc.pid})
                except AgentcgError:
                    if proc.poll() is None:    # gone already: nothing left to account in v1
                        raise
            return proc

        return Call(self, call_id, cgroup_id, procs, spawn, finish)


def spawn_into(procs_files: Sequence[Path], argv: Sequence[str], **popen_kwargs: Any) -> subprocess.Popen:
    """Popen whose child writes itself into each cgroup.procs (fds opened before the fork) and then execs."""
    if isinstance(argv, (str, bytes)) or not argv:
        raise InvalidInput(f"argv must be a non-empty list such as ['ls', '-l'], got {argv!r}")
    fds = []
    try:
        for path in procs_files:
            try:
                fds.append(os.open(path, os.O_WRONLY | os.O_CLOEXEC))
            except FileNotFoundError:
                raise CgroupGone(f"{path}: the tool call's cgroup does not exist (ended already?)") from None
            except PermissionError:
                raise AccessDenied(f"cannot write {path}: the daemon did not hand this cgroup to uid {os.getuid()}") from None
        user_preexec = popen_kwargs.pop("preexec_fn", None)

        def join() -> None:
            for fd in fds:
                os.write(fd, b"0")
            if user_preexec is not None:
                user_preexec()

        if user_preexec is None and popen_kwargs.get("executable") is None and helper_path() is not None:
            popen_kwargs.pop("executable", None)
            return spawn_with_fds(fds, argv, **popen_kwargs)   # vfork: the caller is not forked
        return subprocess.Popen(list(argv), preexec_fn=join, **popen_kwargs)
    finally:
        for fd in fds:
            os.close(fd)


def _unconfirmed_message(exc: Exception) -> str:
    if isinstance(exc, CgroupGone):   # we own the call and never ended it: a daemon did
        return ("the daemon ended this call before the client could (it restarted, or the sandbox was removed); "
                "the daemon's records file has its record")
    return f"no daemon answered to end this call ({exc}); the next daemon adopts and records it"


def _program(command: Sequence[str] | str) -> str:
    first = command.split(None, 1)[0] if isinstance(command, str) and command.strip() else (
        command[0] if not isinstance(command, str) and command else "unknown")
    return os.path.basename(first) or "unknown"
