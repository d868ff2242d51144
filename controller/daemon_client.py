"""The client end of the daemon socket: one connection, and a link that outlives the daemon.

`DaemonConnection` speaks JSON lines (docs/daemon-protocol.md) through the constants and
encoders of `agentcg.daemon_protocol`. A connect that fails raises `DaemonUnavailable`
with `request_sent=False`; a connection that breaks after the request went out raises it
with `request_sent=True`; a refusal raises the error class the protocol table maps its
code to.

`DaemonLink` keeps one connection and, when asked to, retries across a daemon restart:
bounded exponential back-off (50 ms doubling to 2 s, for at most `reconnect_s`), and one
line on stderr when it starts waiting. Which requests may be retried is the caller's
choice: `retry="unsent"` only when nothing reached the daemon (a request that must not
be sent twice), `retry="any"` also after a broken connection (toolcall.end may: ending a
call that already returned changes nothing; toolcall.begin may when it carries a
`request_key`, which makes the daemon answer a repeat with the same call).
"""
from __future__ import annotations

import itertools
import os
import random
import socket
import sys
import threading
import time
from pathlib import Path
from typing import IO, Any

from agentcg.daemon_protocol import (
    DEFAULT_SOCKET, MAX_MESSAGE_BYTES, REQUEST_TIMEOUT_S, SOCKET_ENV, decode_reply, encode_request,
)
from agentcg.errors import DaemonUnavailable, InvalidInput, ProtocolError

RECONNECT_ENV = "AGENTCG_RECONNECT_S"
DEFAULT_RECONNECT_S = 120.0        # a daemon upgrade or restart by systemd takes seconds
MAX_RECONNECT_S = 24 * 3600.0
BACKOFF_FIRST_S = 0.05
BACKOFF_MAX_S = 2.0
RETRY = ("none", "unsent", "any")


def socket_path() -> Path:
    return Path(os.environ.get(SOCKET_ENV) or DEFAULT_SOCKET)


def reconnect_seconds(value: float | None = None) -> float:
    """The retry bound: `value`, else $AGENTCG_RECONNECT_S, else 120 s."""
    if value is None:
        text = os.environ.get(RECONNECT_ENV)
        if not text:
            return DEFAULT_RECONNECT_S
        try:
            value = float(text)
        except ValueError:
            raise InvalidInput(f"{RECONNECT_ENV}={text!r}: give a number of seconds such as 120") from None
    if isinstance(value, bool) or not 0 <= value <= MAX_RECONNECT_S:
        raise InvalidInput(f"reconnect bound must be 0..{MAX_RECONNECT_S:g} seconds, got {value!r}")
    return float(value)


class DaemonConnection:
    """One Unix-socket connection; requests in order, one at a time."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._ids = itertools.count(1)
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(REQUEST_TIMEOUT_S)
        try:
            self._sock.connect(str(path))
        except OSError as exc:
            self._sock.close()
            raise DaemonUnavailable(f"cannot connect to the agentcg daemon at {path}: {exc.strerror or exc}; "
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
            reply = self._read_line(op)
        except socket.timeout:
            self.broken = True
            raise ProtocolError(f"{op}: no answer from the daemon at {self.path} within {timeout_s:g} s") from None
        except OSError as exc:
            self.broken = True
            raise DaemonUnavailable(f"{op}: connection to the daemon at {self.path} failed: {exc.strerror or exc}",
                                    request_sent=True) from None
        except ProtocolError:
            self.broken = True
            raise
        return decode_reply(op, request_id, reply)

    def _read_line(self, op: str) -> bytes:
        while b"\n" not in self._buffer:
            if len(self._buffer) > MAX_MESSAGE_BYTES:
                raise ProtocolError(f"the daemon sent a line longer than {MAX_MESSAGE_BYTES} bytes")
            chunk = self._sock.recv(65536)
            if not chunk:
                raise DaemonUnavailable(f"{op}: the daemon at {self.path} closed the connection "
                                        "(stopped or restarted)", request_sent=True)
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line

    def close(self) -> None:
        self._sock.close()


class DaemonLink:
    """A connection that is replaced when it breaks, with bounded retries (module doc)."""

    def __init__(self, path: Path, *, reconnect_s: float | None = None, stderr: IO[str] | None = None) -> None:
        self.path = path
        self.reconnect_s = reconnect_seconds(reconnect_s)
        self._stderr = stderr
        self._conn: DaemonConnection | None = None
        self._told = False             # said once on stderr that we wait for the daemon
        self._lock = threading.Lock()

    def request(self, op: str, args: dict[str, Any], *, timeout_s: float = REQUEST_TIMEOUT_S,
                retry: str = "none") -> dict[str, Any]:
        if retry not in RETRY:
            raise InvalidInput(f"retry must be one of {', '.join(RETRY)}, got {retry!r}")
        deadline: float | None = None
        delay = BACKOFF_FIRST_S
        with self._lock:
            while True:
                try:
                    return self._request_once(op, args, timeout_s)
                except DaemonUnavailable as exc:
                    if retry == "none" or (exc.request_sent and retry != "any"):
                        raise
                    now = time.monotonic()
                    deadline = now + self.reconnect_s if deadline is None else deadline
                    if now >= deadline:
                        raise DaemonUnavailable(f"{exc}; gave up after {self.reconnect_s:g} s of retries "
                                                f"(set {RECONNECT_ENV} to wait longer)", exc.request_sent) from None
                    self._say_once(exc)
                    time.sleep(min(delay * (1 + random.random() / 5), max(0.0, deadline - now)))
                    delay = min(delay * 2, BACKOFF_MAX_S)

    def _request_once(self, op: str, args: dict[str, Any], timeout_s: float) -> dict[str, Any]:
        if self._conn is not None and (self._conn.broken or self._conn.closed_by_peer()):
            # the daemon closes idle connections (300 s), e.g. during a long tool call, or it restarted
            self._conn.close()
            self._conn = None
        if self._conn is None:
            self._conn = DaemonConnection(self.path)
        return self._conn.request(op, args, timeout_s)

    def _say_once(self, exc: DaemonUnavailable) -> None:
        if self._told:
            return
        self._told = True
        stream = self._stderr if self._stderr is not None else sys.stderr
        try:
            stream.write(f"agentcg: {exc}; retrying for up to {self.reconnect_s:g} s "
                         "(the command keeps running)\n")
            stream.flush()
        except (OSError, ValueError):
            pass

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None
