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
import socket
import stat
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agentcg.daemon_protocol import (  # the constants both ends share; encode_* re-exported
    ERROR_CODES, MAX_MESSAGE_BYTES, MAX_OUTPUT_BYTES, PROTOCOL_VERSION, code_for, encode_error, encode_result,
)
from agentcg.errors import AccessDenied, InvalidInput, ProtocolError
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
    pid: int
    uid: int
    gid: int

    @property
    def is_root(self) -> bool:
        return self.uid == 0


def peer_credentials(sock: socket.socket) -> PeerCred:
    """SO_PEERCRED: who connected (as of connect(); the kernel fills it, clients cannot lie)."""
    pid, uid, gid = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
    return PeerCred(pid, uid, gid)


@dataclass(frozen=True)
class Request:
    id: int | None
    op: str
    args: dict[str, Any]


def parse_request(line: bytes) -> Request:
    """One JSON line -> Request, or ApiError('invalid_input') naming what is wrong."""
    try:
        data = json.loads(line)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ApiError("invalid_input", f"request is not valid JSON ({exc}); send one JSON object per line") from None
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
