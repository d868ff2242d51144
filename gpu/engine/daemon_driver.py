"""Runs the reference engine against the agentcg daemon over its socket.

The engine's messages (register, request events, KV usage, directive results) go out on the
link as they happen; a reader thread submits the daemon's directives to the engine's inbox
(a bounded deque: appends are thread-safe), which the engine applies at its next iteration.
While attached the engine is passive: its own KV policy neither decides nor observes (two
policies never decide on the same KV); only its vLLM rule under memory pressure remains.
"""
from __future__ import annotations

import os
import threading

from agentcg.engine_link import DEFAULT_SOCKET, EngineLink
from agentcg.engine_protocol import Directive, Message
from agentcg.errors import ProtocolError
from agentcg.gpu.engine.engine import Engine


class DaemonDriver:
    def __init__(self, socket_path: str | os.PathLike = DEFAULT_SOCKET) -> None:
        self.link = EngineLink(socket_path)
        self.engine: Engine | None = None
        self.received: list[Directive] = []
        self.error: ProtocolError | None = None
        self._reader: threading.Thread | None = None

    def attach(self, engine: Engine) -> dict:
        self.engine = engine
        answer = self.link.attach(engine.register())
        engine.listener = self._send
        engine.passive = True        # the daemon's policy decides; the engine's own stays out
        self._reader = threading.Thread(target=self._read_loop, name="agentcg-engine-link", daemon=True)
        self._reader.start()
        return answer

    def _send(self, message: Message) -> None:
        try:
            self.link.send(message)
        except OSError as exc:
            self.error = ProtocolError(f"the daemon link broke while sending: {exc.strerror}")

    def _read_loop(self) -> None:
        assert self.engine is not None
        while True:
            try:
                message = self.link.read()
            except (ProtocolError, OSError, ValueError) as exc:
                self.error = exc if isinstance(exc, ProtocolError) else ProtocolError(str(exc))
                return
            if message is None:
                return
            if isinstance(message, Directive):
                self.received.append(message)
                self.engine.submit(message)

    def close(self) -> None:
        self.link.close()
        if self._reader is not None:
            self._reader.join(timeout=5)
        if self.engine is not None:
            self.engine.listener = None
            self.engine.passive = False
