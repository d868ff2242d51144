"""Mark tool calls from inside an agent framework: each call runs in its own cgroup and
ends with a `ToolCallRecord`.

    from agentcg.client import tool_call, run_tool

    result = run_tool("sb1", ["pytest", "-x"], tool="pytest")    # -> CallResult
    print(result.returncode, result.record.peak_memory_bytes)

    with tool_call("sb1", tool="build", command="make -j2") as call:
        proc = call.spawn(["make", "-j2"])
        proc.wait()
    print(call.record.cpu_s)

Two modes behind one API (`Client(mode="auto")` picks):
- daemon: the agentcg daemon's Unix socket exists ($AGENTCG_SOCKET, else
  /run/agentcg/agentcg.sock); the client speaks docs/daemon-protocol.md (toolcall.begin
  returns the cgroup.procs files the child joins before exec; toolcall.end returns the record);
- local: no socket and we are root; the client drives a ToolCallManager in this process
  (and loads the eBPF programs once, unless ebpf=False), reaping orphans of dead owners first.
"""
from __future__ import annotations

import contextlib
import itertools
import os
import socket
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from agentcg.daemon_protocol import (
    DEFAULT_SOCKET, END_TIMEOUT_S, MAX_MESSAGE_BYTES, REQUEST_TIMEOUT_S, SOCKET_ENV, Method, decode_reply,
    encode_request,
)
from agentcg.errors import AccessDenied, CgroupGone, HostUnsupported, InvalidInput, ProtocolError
from agentcg.records import ToolCallRecord, status_of

MODES = ("auto", "daemon", "local")


@dataclass(frozen=True)
class CallResult:
    returncode: int              # Popen style: negative = killed by that signal
    record: ToolCallRecord


def socket_path() -> Path:
    return Path(os.environ.get(SOCKET_ENV) or DEFAULT_SOCKET)


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
                 ebpf: bool = True, grace_s: float | None = None) -> None:
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
        self.grace_s = grace_s
        self._lock = threading.Lock()
        self._manager: Any = None
        self._monitor: Any = None
        self._conn: _Connection | None = None

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
            if self._conn is not None:
                self._conn.close()
                self._conn = None

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

                tree = open_tree(root=self.root)
                reap_orphans(tree, self.state)
                if self.ebpf:
                    from agentcg.bpf.monitor import BpfMonitor
                    self._monitor = BpfMonitor()
                self._manager = ToolCallManager(
                    tree, monitor=self._monitor, records_path=self.records_path,
                    grace_s=DEFAULT_GRACE_S if self.grace_s is None else self.grace_s, state=self.state)
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
    def request(self, op: str, args: dict[str, Any] | None = None) -> dict[str, Any]:
        """One daemon request; the result object, or the mapped agentcg error."""
        with self._lock:
            if self._conn is not None and (self._conn.broken or self._conn.closed_by_peer()):
                # the daemon closes idle connections (300 s), e.g. during a long tool call
                self._conn.close()
                self._conn = None
            if self._conn is None:
                self._conn = _Connection(self.socket_path)
            timeout_s = END_TIMEOUT_S if op == Method.TOOLCALL_END else REQUEST_TIMEOUT_S
            return self._conn.request(op, args or {}, timeout_s)

    def _begin_daemon(self, sandbox: str, tool: str | None, command: Sequence[str] | str,
                      mem_hint_bytes: int | None, priority: str) -> Call:
        from agentcg.records import truncate_command

        args: dict[str, Any] = {"sandbox": sandbox, "tool": tool or _program(command),
                                "command": truncate_command(command if isinstance(command, str) else list(command)),
                                "priority": priority}
        if mem_hint_bytes is not None:
            args["mem_hint_bytes"] = mem_hint_bytes
        result = self.request(Method.TOOLCALL_BEGIN, args)
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
            return ToolCallRecord.from_dict(self.request(Method.TOOLCALL_END, end_args).get("record"))

        def spawn(argv: Sequence[str], **kw: Any) -> subprocess.Popen:
            proc = spawn_into(procs, argv, **kw)
            if result.get("attach_needed"):   # v1 hierarchies: only the daemon may move it there
                try:
                    self.request("toolcall.attach", {"call_id": call_id, "pid": proc.pid})
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

        return subprocess.Popen(list(argv), preexec_fn=join, **popen_kwargs)
    finally:
        for fd in fds:
            os.close(fd)


class _Connection:
    """One Unix-socket connection speaking JSON lines (docs/daemon-protocol.md)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._ids = itertools.count(1)
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(REQUEST_TIMEOUT_S)
        try:
            self._sock.connect(str(path))
        except OSError as exc:
            self._sock.close()
            raise HostUnsupported(f"cannot connect to the agentcg daemon at {path}: {exc.strerror or exc}; "
                                  "is `agentcg daemon` running?") from None
        self._buffer = b""
        self.broken = False   # a transport failure: replies may be out of step, never reuse it

    def closed_by_peer(self) -> bool:
        # non-blocking for the peek: with a timeout set, Python would first wait for data
        self._sock.setblocking(False)
        try:
            return self._sock.recv(1, socket.MSG_PEEK) == b""
        except BlockingIOError:
            return False
        except OSError:
            return True
        finally:
            self._sock.settimeout(REQUEST_TIMEOUT_S)

    def request(self, op: str, args: dict[str, Any], timeout_s: float = REQUEST_TIMEOUT_S) -> dict[str, Any]:
        request_id = next(self._ids)
        line = encode_request(request_id, op, args)
        try:
            self._sock.settimeout(timeout_s)
            self._sock.sendall(line)
            reply = self._read_line()
        except socket.timeout:
            self.broken = True
            raise ProtocolError(f"{op}: no answer from the daemon at {self.path} within {timeout_s:g} s") from None
        except OSError as exc:
            self.broken = True
            raise ProtocolError(f"{op}: connection to the daemon at {self.path} failed: {exc.strerror or exc}") from None
        except ProtocolError:
            self.broken = True
            raise
        return decode_reply(op, request_id, reply)

    def _read_line(self) -> bytes:
        while b"\n" not in self._buffer:
            if len(self._buffer) > MAX_MESSAGE_BYTES:
                raise ProtocolError(f"the daemon sent a line longer than {MAX_MESSAGE_BYTES} bytes")
            chunk = self._sock.recv(65536)
            if not chunk:
                raise ProtocolError(f"the daemon at {self.path} closed the connection")
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line

    def close(self) -> None:
        self._sock.close()


def _program(command: Sequence[str] | str) -> str:
    first = command.split(None, 1)[0] if isinstance(command, str) and command.strip() else (
        command[0] if not isinstance(command, str) and command else "unknown")
    return os.path.basename(first) or "unknown"


# ---- module-level helpers over one default client ------------------------------------
_default: Client | None = None
_default_lock = threading.Lock()


def default_client() -> Client:
    global _default
    with _default_lock:
        if _default is None:
            _default = Client()
        return _default


def tool_call(sandbox: str, tool: str | None = None, command: Sequence[str] | str | None = None, *,
              mem_hint_bytes: int | None = None, priority: str = "normal") -> contextlib.AbstractContextManager[Call]:
    """Context manager over the default client: `with tool_call("sb1", "pytest") as call: call.spawn([...])`."""
    return default_client().tool_call(sandbox, tool, command, mem_hint_bytes=mem_hint_bytes, priority=priority)


def run_tool(sandbox: str, argv: Sequence[str], **kwargs: Any) -> CallResult:
    """Run argv as one tool call with the default client; see `Client.run`."""
    return default_client().run(sandbox, argv, **kwargs)
