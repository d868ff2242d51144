"""The vLLM connector's link to the agentcg daemon: attach, send, receive, and survive.

A background thread keeps an engine link (agentcg.engine_link) to the daemon: it attaches,
registers, reads directives into a queue the scheduler side drains, and when the daemon is
absent, refuses, closes the link or restarts, it logs once, marks the link down (the
connector then behaves as plain vLLM) and tries again every `retry_s`. Sends never block
vLLM's scheduler for long and never raise: a message sent while the link is down is
dropped (counted). After a reconnect `on_up` runs, so the connector can re-report what it
holds.
"""
from __future__ import annotations

import collections
import logging
import os
import threading
from typing import Callable

from agentcg.engine_link import EngineLink
from agentcg.engine_protocol import Directive, Message, Register, encode
from agentcg.errors import ProtocolError

log = logging.getLogger("agentcg.vllm.link")

MAX_QUEUED_DIRECTIVES = 4096


class DaemonLink:
    def __init__(self, socket_path: str | os.PathLike, register: Callable[[], Register], *,
                 retry_s: float = 2.0, on_up: Callable[[], None] | None = None) -> None:
        self.socket_path = str(socket_path)
        self._register = register
        self.retry_s = retry_s
        self.on_up = on_up
        self.directives: collections.deque[Directive] = collections.deque(maxlen=MAX_QUEUED_DIRECTIVES)
        self._link: EngineLink | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._warned = False
        self._bad_warned = False
        self.attaches = 0
        self.dropped = 0
        self.kv_policy: str | None = None
        self._thread = threading.Thread(target=self._run, name="agentcg-daemon-link", daemon=True)
        self._thread.start()

    @property
    def up(self) -> bool:
        return self._link is not None

    def send(self, message: Message) -> bool:
        link = self._link
        if link is None:
            self.dropped += 1
            return False
        try:
            encode(message)              # a message the codec refuses is our bug: drop it, keep the link
        except ProtocolError as exc:
            self.dropped += 1
            if not self._bad_warned:
                log.error("agentcg connector: dropping a %s the engine protocol refuses: %s",
                          type(message).__name__, exc)
                self._bad_warned = True
            return False
        try:
            link.send(message)
            return True
        except (OSError, ProtocolError) as exc:
            self._down(f"sending failed: {exc}")
            self.dropped += 1
            return False

    def _down(self, why: str) -> None:
        with self._lock:
            link, self._link = self._link, None
        if link is not None:
            log.warning("agentcg daemon link at %s lost (%s): plain vLLM behaviour until it is back",
                        self.socket_path, why)
            self._warned = True
            link.close()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                link = EngineLink(self.socket_path)
                answer = link.attach(self._register())
            except (ProtocolError, OSError) as exc:
                if not self._warned:
                    log.warning("agentcg daemon not reachable (%s): vLLM runs without it (plain vLLM "
                                "behaviour) and the connector retries every %.0f s", exc, self.retry_s)
                    self._warned = True
                self._stop.wait(self.retry_s)
                continue
            with self._lock:
                self._link = link
            self.attaches += 1
            self.kv_policy = answer.get("kv_policy")
            log.info("attached to the agentcg daemon at %s (link %s, KV policy %s)", self.socket_path,
                     answer.get("link_id"), self.kv_policy)
            self._warned = False
            if self.on_up is not None:
                try:
                    self.on_up()
                except Exception:
                    log.exception("re-reporting after the attach failed")
            self._read(link)
            if not self._stop.is_set():
                self._stop.wait(min(self.retry_s, 0.5))

    def _read(self, link: EngineLink) -> None:
        while not self._stop.is_set():
            try:
                message = link.read()
            except (ProtocolError, OSError, ValueError) as exc:
                self._down(str(exc))
                return
            if message is None:
                self._down("the daemon closed the link")
                return
            if isinstance(message, Directive):
                self.directives.append(message)

    def take(self) -> list[Directive]:
        out = []
        while self.directives:
            out.append(self.directives.popleft())
        return out

    def close(self) -> None:
        self._stop.set()
        self._down("closing")
        self._thread.join(timeout=2.0)
