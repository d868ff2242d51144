"""The daemon's Unix socket: JSON-lines framing with fixed limits, peer credentials.

docs/daemon-protocol.md is the contract. This module knows bytes, lines and who is on
the other end; what an operation does is the service's business. All sockets are
non-blocking: the service's epoll loop calls `Connection.receive()` / `flush()` when
the kernel says they are ready, and `expired()` from its timer.
"""
from __future__ import annotations

import errno
import json
import os
import select
import socket
import stat
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agentcg.daemon_protocol import (  # the constants both ends share; encode_* re-exported
    ERROR_CODES, MAX_MESSAGE_BYTES, MAX_OUTPUT_BYTES, PROTOCOL_VERSION, code_for, encode_error, encode_result,
)
from agentcg.errors import AccessDenied, AgentcgError, InvalidInput, ProtocolError
from agentcg.procfs import PROC

_RECV_BYTES = 65536
_UCRED = struct.Struct("3i")          # struct ucred: pid, uid, gid


class ApiError(ProtocolError):
    """A refused request: `code` is one of ERROR_CODES, the message says how to fix it."""

    def __init__(self, code: str, message: str) -> None:
        assert code in ERROR_CODES, code
        super().__init__(message)
        self.code = code


def error_code(exc: BaseException) -> str:
    """The protocol's error code for an exception raised while serving a request."""
    return code_for(exc)


@dataclass(frozen=True)
class PeerCred:
    """Who is on the other end, fixed when the connection was accepted and never re-read
    from a bare pid: the pid may be recycled, the pidfd cannot (docs/daemon.md, "Who may
    call what"). `cgroup` is the peer's v2 cgroup path as of accept, None when the peer
    was gone before it could be read; `pidfd` is -1 where the kernel has no pidfds."""

    pid: int
    uid: int
    gid: int
    start_ticks: int = 0
    cgroup: str | None = None
    pidfd: int = field(default=-1, compare=False)
    groups: tuple[int, ...] = ()

    @property
    def is_root(self) -> bool:
        return self.uid == 0

    def sandbox(self, root: str) -> str | None:
        """The sandbox the peer lived in when it connected (from its v2 cgroup), or None."""
        prefix = f"/{root}/"
        if self.cgroup is None or not self.cgroup.startswith(prefix):
            return None
        return self.cgroup[len(prefix):].split("/", 1)[0] or None

    def alive(self) -> bool:
        """Whether the process that connected still runs (a zombie is dead)."""
        return pidfd_alive(self.pidfd, self.pid, self.start_ticks)


def peer_credentials(sock: socket.socket) -> PeerCred:
    """SO_PEERCRED (as of connect(); the kernel fills it, clients cannot lie) plus a pidfd
    of that very process (SO_PEERPIDFD, Linux 6.5+; else pidfd_open of the pid, checked
    below), and what /proc says about it, read once and then confirmed through the pidfd:
    a pid reused while we read belongs to a new process, and the pidfd then says the old
    one is dead, so the peer gets no cgroup (no sandbox's rights)."""
    pid, uid, gid = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
    pidfd = -1
    try:
        pidfd = sock.getsockopt(socket.SOL_SOCKET, SO_PEERPIDFD)
    except OSError:
        try:
            pidfd = os.pidfd_open(pid)
        except OSError:
            pidfd = -1
    info = ProcFacts.read(pid)
    if info is None or pidfd < 0 or not pidfd_alive(pidfd, pid, info.start_ticks):
        # gone already (or no pidfds): identity is the uid alone, no sandbox
        return PeerCred(pid, uid, gid, 0, None, pidfd)
    return PeerCred(pid, uid, gid, info.start_ticks, info.cgroup, pidfd, info.groups)


SO_PEERPIDFD = getattr(socket, "SO_PEERPIDFD", 77)   # include/uapi/asm-generic/socket.h, Linux 6.5


@dataclass(frozen=True)
class ProcFacts:
    """What the daemon needs from /proc/<pid> about a peer or a process to move."""

    start_ticks: int
    state: str
    uid: int
    cgroup: str | None            # the v2 ("0::") path
    groups: tuple[int, ...]

    @staticmethod
    def read(pid: int) -> "ProcFacts | None":
        """Through agentcg.procfs; None when the process is gone or unreadable."""
        try:
            stat, status = PROC.stat(pid), PROC.status(pid)
            cgroup = PROC.v2_cgroup(pid)
        except AgentcgError:
            return None
        return ProcFacts(stat.start_ticks, stat.state, status.uids[1], cgroup, tuple(sorted(status.groups)))


def pidfd_alive(pidfd: int, pid: int, start_ticks: int) -> bool:
    """True while the process behind `pidfd` runs; a zombie counts as dead (a pidfd polls
    readable once its process exited, reaped or not). Without a pidfd, the pid's start
    time must still match and the process must not be a zombie (the best /proc can say)."""
    if pidfd >= 0:
        poller = select.poll()
        poller.register(pidfd, select.POLLIN)
        return not poller.poll(0)
    return PROC.is_alive(pid, start_ticks)


@dataclass(frozen=True)
class Request:
    id: int | None
    op: str
    args: dict[str, Any]


def parse_request(line: bytes) -> Request:
    """One JSON line -> Request, or ApiError('invalid_input') naming what is wrong."""
    try:
        data = json.loads(line)
    except RecursionError:
        raise ApiError("invalid_input", "request is nested too deeply; send a flat JSON object") from None
    except ValueError as exc:   # JSONDecodeError, UnicodeDecodeError, an integer over 4300 digits
        raise ApiError("invalid_input", f"request is not valid JSON ({str(exc)[:200]}); "
                                        "send one JSON object per line") from None
    if not isinstance(data, dict):
        raise ApiError("invalid_input", f"request must be a JSON object, got {type(data).__name__}")
    request_id = data.get("id")
    if request_id is not None and (isinstance(request_id, bool) or not isinstance(request_id, int)):
        raise ApiError("invalid_input", f"'id' must be an integer, got {request_id!r}")
    unknown = sorted(set(data) - {"v", "id", "op", "args"})
    problem = None
    if data.get("v") != PROTOCOL_VERSION:
        problem = f"'v' must be {PROTOCOL_VERSION} (this daemon speaks protocol version {PROTOCOL_VERSION}), got {data.get('v')!r}"
    elif not isinstance(data.get("op"), str):
        problem = "'op' must be a string such as \"ping\""
    elif not isinstance(data.get("args", {}), dict):
        problem = "'args' must be a JSON object"
    elif unknown:
        problem = f"unknown request field(s) {', '.join(unknown)}; a request has v, id, op, args"
    if problem:
        error = ApiError("invalid_input", problem)
        error.request_id = request_id  # type: ignore[attr-defined]
        raise error
    return Request(request_id, data["op"], data.get("args", {}))


class Connection:
    """One client: bounded input and output buffers, a deadline for a started line,
    and at most one request being served at a time (answers stay in order)."""

    def __init__(self, sock: socket.socket, peer: PeerCred, now: float) -> None:
        self.sock = sock
        self.peer = peer
        self.inbuf = bytearray()
        self.outbuf = bytearray()
        self.line_started: float | None = None
        self.last_active = now
        self.busy = False          # a request's answer is deferred (toolcall.end waiting)
        self.closing = False       # close once outbuf is flushed
        self.interest = 0          # the epoll events last registered for it (the loop keeps it)
        # where `send` puts it to be flushed at the end of the loop's turn (None: at once), so
        # the answers of one turn go out together, after the turn's state is saved
        self.unflushed: set["Connection"] | None = None

    def fileno(self) -> int:
        return self.sock.fileno()

    def receive(self, now: float) -> bool:
        """Read what is there; False when the peer closed or the socket failed."""
        try:
            data = self.sock.recv(_RECV_BYTES)
        except (BlockingIOError, InterruptedError):
            return True
        except OSError:
            return False
        if not data:
            return False
        self.inbuf += data
        self.last_active = now
        if self.line_started is None:
            self.line_started = now
        return True

    def next_line(self, now: float) -> bytes | None:
        """The next complete line, or None. ApiError('too_large') for an oversized one."""
        end = self.inbuf.find(b"\n", 0, MAX_MESSAGE_BYTES + 1)
        if end < 0:
            if len(self.inbuf) > MAX_MESSAGE_BYTES:
                raise ApiError("too_large", f"request line longer than {MAX_MESSAGE_BYTES} bytes; "
                                            "send smaller requests (the connection is closed)")
            return None
        line = bytes(self.inbuf[:end])
        del self.inbuf[:end + 1]
        self.line_started = now if self.inbuf else None
        return line

    def send(self, data: bytes) -> None:
        self.outbuf += data
        if len(self.outbuf) > MAX_OUTPUT_BYTES:
            self.outbuf.clear()
            self.closing = True
        if self.unflushed is not None:
            self.unflushed.add(self)
        else:
            self.flush()

    def flush(self) -> bool:
        """Write what the socket takes; False when the peer is gone."""
        while self.outbuf:
            try:
                sent = self.sock.send(self.outbuf)
            except (BlockingIOError, InterruptedError):
                return True
            except OSError:
                self.outbuf.clear()
                return False
            del self.outbuf[:sent]
        return True

    def expired(self, now: float, line_timeout_s: float, idle_timeout_s: float) -> str | None:
        """Why this connection should be dropped now, or None."""
        if self.busy:
            return None
        if self.line_started is not None and now - self.line_started > line_timeout_s:
            return f"no complete request line within {line_timeout_s:g} s"
        if not self.inbuf and now - self.last_active > idle_timeout_s:
            return f"idle for {idle_timeout_s:g} s"
        return None

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass
        if self.peer.pidfd >= 0:
            try:
                os.close(self.peer.pidfd)
            except OSError:
                pass
            object.__setattr__(self.peer, "pidfd", -1)


class ConnectionSlots:
    """Who may hold how many of the daemon's connections. Slots are counted per uid as
    soon as a connection is accepted (its credentials are known then): a non-root uid holds
    at most `per_uid`, all non-root uids together at most `total - root_reserved`, so the
    last `root_reserved` slots are always there for root (`agentcg run`, the operator)."""

    def __init__(self, total: int, per_uid: int, root_reserved: int) -> None:
        self.total, self.per_uid, self.root_reserved = total, per_uid, min(root_reserved, total)
        self.by_uid: dict[int, int] = {}
        self.used = 0

    def refuse(self, uid: int) -> str | None:
        """Why a new connection of `uid` is refused (the `busy` message), or None: take it."""
        if self.used >= self.total:
            return f"all {self.total} connections are in use ([protocol] max_connections); retry later"
        if uid == 0:
            return None
        if self.by_uid.get(uid, 0) >= self.per_uid:
            return (f"uid {uid} holds {self.per_uid} connections already ([protocol] "
                    "max_connections_per_uid); close some")
        if self.used - self.by_uid.get(0, 0) >= self.total - self.root_reserved:
            return (f"the {self.total - self.root_reserved} connections open to non-root users are in use "
                    f"({self.root_reserved} stay reserved for root: [protocol] root_connections); retry later")
        return None

    def take(self, uid: int) -> None:
        self.by_uid[uid] = self.by_uid.get(uid, 0) + 1
        self.used += 1

    def release(self, uid: int) -> None:
        left = self.by_uid.get(uid, 0) - 1
        if left > 0:
            self.by_uid[uid] = left
        else:
            self.by_uid.pop(uid, None)
        self.used = max(0, self.used - 1)


class RateLimitedLog:
    """At most `burst` lines per `per_s` seconds per key (a peer's uid, say); what is held
    back is counted and said in the next line that gets through. A peer sending garbage
    cannot fill the log."""

    def __init__(self, logger: Any, burst: int = 10, per_s: float = 60.0, max_keys: int = 1024) -> None:
        self.logger, self.burst, self.per_s, self.max_keys = logger, burst, per_s, max_keys
        self._windows: dict[Any, list[float]] = {}     # key -> [window start, lines, suppressed]

    def log(self, level: int, key: Any, msg: str, *args: Any, now: float, exc_info: bool = False) -> bool:
        window = self._windows.get(key)
        if window is None or now - window[0] >= self.per_s:
            if window is None and len(self._windows) >= self.max_keys:
                self._windows.clear()
            suppressed = int(window[2]) if window else 0
            window = self._windows[key] = [now, 0, 0]
            if suppressed:
                msg += f" ({suppressed} similar lines suppressed)"
        if window[1] >= self.burst:
            window[2] += 1
            return False
        window[1] += 1
        self.logger.log(level, msg, *args, exc_info=exc_info)
        return True


class UnixListener:
    """The listening socket at `path`, mode `mode`, group `gid` (None: unchanged)."""

    def __init__(self, path: Path, mode: int, gid: int | None) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_socket(self.path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
        try:
            # bind under a umask that hides the socket until its mode and group are set
            old_umask = os.umask(0o177)
            try:
                sock.bind(str(self.path))
            finally:
                os.umask(old_umask)
            if gid is not None:
                os.chown(self.path, -1, gid)
            os.chmod(self.path, mode)
            sock.listen(128)
        except OSError as exc:
            sock.close()
            raise AccessDenied(f"cannot listen on {self.path}: {exc.strerror}; is another daemon running, "
                               "and may this user write there?") from None
        self.sock = sock
        self._inode = os.stat(self.path).st_ino

    def fileno(self) -> int:
        return self.sock.fileno()

    def accept(self) -> tuple[socket.socket, PeerCred] | None:
        try:
            conn, _ = self.sock.accept()
        except (BlockingIOError, InterruptedError):
            return None
        except OSError as exc:
            if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM, errno.ECONNABORTED):
                return None
            raise
        conn.setblocking(False)
        return conn, peer_credentials(conn)

    def close(self) -> None:
        self.sock.close()
        try:  # only our own socket: a newer daemon may have bound the path since
            if os.stat(self.path).st_ino == self._inode:
                os.unlink(self.path)
        except OSError:
            pass


def _remove_stale_socket(path: Path) -> None:
    """Unlink a socket left by a dead daemon; refuse when one still answers there."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise InvalidInput(f"{path} exists and is not a socket; choose another socket_path or remove it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(str(path))
    except OSError:
        os.unlink(path)  # nobody listens: stale
        return
    finally:
        probe.close()
    raise InvalidInput(f"another daemon is listening on {path}; stop it first or choose another socket_path")
