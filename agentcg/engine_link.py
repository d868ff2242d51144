"""An inference engine's connection to the agentcg daemon (engine side).

One `engine.attach` request on the daemon's socket (docs/daemon-protocol.md), then the same
connection carries engine-protocol JSON lines both ways (agentcg.engine_protocol): the
engine's `Register` first, then its events and usage out, the daemon's directives in.
Lives here, beside the protocol types, because engines (agentcg.gpu.engine, or any other)
must reach the daemon only through the protocol, never by importing the controller.
"""
from __future__ import annotations

import json
import os
import socket
import threading
from pathlib import Path

from agentcg.engine_protocol import MAX_LINE_BYTES, Message, Register, decode, encode
from agentcg.errors import ProtocolError

DEFAULT_SOCKET = Path(os.environ.get("AGENTCG_SOCKET", "/run/agentcg/agentcg.sock"))
ATTACH_TIMEOUT_S = 5.0


class EngineLink:
    """Thread-safe sends; one reader (`read`) at a time."""

    def __init__(self, socket_path: str | os.PathLike = DEFAULT_SOCKET, *,
                 timeout_s: float = ATTACH_TIMEOUT_S) -> None:
        self.socket_path = Path(socket_path)
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(timeout_s)
        try:
            self._sock.connect(str(self.socket_path))
        except OSError as exc:
            self._sock.close()
            raise ProtocolError(f"cannot reach the agentcg daemon at {self.socket_path}: {exc.strerror}; "
                                "is `agentcg daemon` running (or AGENTCG_SOCKET set)?") from None
        self._reader = self._sock.makefile("rb")
        self._send_lock = threading.Lock()
        self.attached: dict | None = None

    def attach(self, register: Register) -> dict:
        """Turn the connection into an engine link and register; returns the daemon's answer
        (link_id, engine_protocol, kv_policy, max_line_bytes)."""
        request = {"v": 1, "id": 1, "op": "engine.attach", "args": {}}
        self._sock.sendall(json.dumps(request).encode() + b"\n")
        answer = self._line()
        if answer is None:
            raise ProtocolError(f"the daemon at {self.socket_path} closed the connection during engine.attach")
        try:
            reply = json.loads(answer)
        except json.JSONDecodeError:
            raise ProtocolError(f"engine.attach: the daemon answered with a non-JSON line {answer[:80]!r}") from None
        if not reply.get("ok"):
            error = reply.get("error", {})
            raise ProtocolError(f"engine.attach refused ({error.get('code')}): {error.get('message')}")
        self.attached = reply["result"]
        self._sock.settimeout(None)
        self.send(register)
        return self.attached

    def send(self, message: Message) -> None:
        line = encode(message)
        with self._send_lock:
            self._sock.sendall(line)

    def read(self) -> Message | None:
        """The next message from the daemon (blocking); None when it closed the link.
        A daemon error line (it refused something we sent) raises ProtocolError."""
        line = self._line()
        if line is None:
            return None
        try:
            return decode(line)
        except ProtocolError:
            try:
                error = json.loads(line).get("error")
            except (json.JSONDecodeError, AttributeError):
                error = None
            if error:
                raise ProtocolError(f"the daemon refused a message ({error.get('code')}): {error.get('message')}") from None
            raise

    def _line(self) -> bytes | None:
        line = self._reader.readline(MAX_LINE_BYTES + 1)
        if not line:
            return None
        if not line.endswith(b"\n"):
            raise ProtocolError(f"a line from the daemon is over {MAX_LINE_BYTES} bytes or cut off")
        return line

    def close(self) -> None:
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._reader.close()
        self._sock.close()

    def __enter__(self) -> "EngineLink":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
