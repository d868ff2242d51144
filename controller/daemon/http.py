"""The /metrics endpoint's sockets in the daemon's epoll: a listener, and one short-lived
HttpConnection (metrics.py) per scrape, dropped after HTTP_TIMEOUT_S."""
from __future__ import annotations

import select
import socket
import time
from typing import Any, Callable

from agentcg.controller.daemon.config import parse_address
from agentcg.controller.daemon.metrics import HTTP_TIMEOUT_S, HttpConnection, http_response
from agentcg.errors import InvalidInput

MAX_HTTP_CONNECTIONS = 16


class MetricsEndpoint:
    def __init__(self, address: str, registry: Any, register: Callable[[int, int, Callable[[int, int], None]], None],
                 unregister: Callable[[int], None], modify: Callable[[int, int], None]) -> None:
        self.registry = registry
        self._register, self._unregister, self._modify = register, unregister, modify
        self._http: dict[int, HttpConnection] = {}
        host, port = parse_address(address)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
            sock.listen(16)
        except OSError as exc:
            sock.close()
            raise InvalidInput(f"metrics address {address}: {exc.strerror}; choose another [metrics] address "
                               "or \"\" to disable") from None
        self._sock: socket.socket | None = sock
        bound = sock.getsockname()
        self.address = f"[{bound[0]}]:{bound[1]}" if family == socket.AF_INET6 else f"{bound[0]}:{bound[1]}"
        self._register(sock.fileno(), select.EPOLLIN, self._on_accept)

    def expire(self, now: float) -> None:
        for http in list(self._http.values()):
            if now - http.started > HTTP_TIMEOUT_S:
                self._drop(http)

    def close(self) -> None:
        for http in list(self._http.values()):
            self._drop(http)
        if self._sock is not None:
            self._unregister(self._sock.fileno())
            self._sock.close()
            self._sock = None

    def _on_accept(self, fd: int, mask: int) -> None:
        if self._sock is None:
            return
        try:
            sock, _ = self._sock.accept()
        except OSError:
            return
        if len(self._http) >= MAX_HTTP_CONNECTIONS:
            sock.close()
            return
        sock.setblocking(False)
        http = HttpConnection(sock, time.monotonic())
        self._http[sock.fileno()] = http
        self._register(sock.fileno(), select.EPOLLIN, self._on_http)

    def _on_http(self, fd: int, mask: int) -> None:
        http = self._http.get(fd)
        if http is None:
            return
        if not http.answered:
            try:
                head = http.receive()
            except (OSError, ValueError):
                self._drop(http)
                return
            if head is None:
                return
            http.answer(*http_response(head, self.registry))
        if http.flush():
            self._drop(http)
        else:
            self._modify(fd, select.EPOLLOUT)

    def _drop(self, http: HttpConnection) -> None:
        fd = http.fileno()
        if fd >= 0:
            self._http.pop(fd, None)
            self._unregister(fd)
        http.close()
