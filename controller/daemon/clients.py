"""The daemon's API clients in its epoll: accept (bounded by max_connections), read
request lines, route each to its operation (api.py) or, once a connection became an
engine link, to the engine hub; answer, and keep the epoll interest in step with what
is left to write. The framing and the Connection type live in server.py.

A mixin of service.Daemon: it uses the daemon's epoll plumbing, `api`, `stats`, `engines`
and the waiters of calls being finished or admitted.
"""
from __future__ import annotations

import logging
import select
import time

from agentcg.controller.daemon.api import DEFERRED
from agentcg.controller.daemon.server import ApiError, Connection, encode_error, encode_result, error_code, parse_request
from agentcg.errors import AgentcgError

log = logging.getLogger("agentcg.daemon")

_IN = select.EPOLLIN | select.EPOLLRDHUP


class ClientConnections:
    def _on_accept(self, fd: int, mask: int) -> None:
        assert self._listener is not None
        for _ in range(64):
            accepted = self._listener.accept()
            if accepted is None:
                return
            sock, peer = accepted
            conn = Connection(sock, peer, time.monotonic())
            refused = self._slots.refuse(peer.uid)       # per uid, with slots kept for root
            if refused is not None:
                conn.send(encode_error(None, "busy", refused))
                conn.close()
                self.stats.observe_request("connect", "busy")
                self._bad_requests.log(logging.WARNING, ("busy", peer.uid), "connection of uid %d refused: %s",
                                       peer.uid, refused, now=time.monotonic())
                continue
            self._slots.take(peer.uid)
            self._conns[conn.fileno()] = conn
            self._register(conn.fileno(), _IN, self._on_client)
            conn.interest, conn.unflushed = _IN, self._unflushed

    def _on_client(self, fd: int, mask: int) -> None:
        conn = self._conns.get(fd)
        if conn is None:
            return
        now = time.monotonic()
        if mask & select.EPOLLIN and not conn.receive(now):
            self._drop(conn)
            return
        if mask & select.EPOLLOUT and not conn.flush():
            self._drop(conn)
            return
        if mask & (select.EPOLLERR | select.EPOLLHUP) and not conn.inbuf:
            self._drop(conn)
            return
        self._serve(conn)

    def _serve(self, conn: Connection) -> None:
        now = time.monotonic()
        while not conn.busy and not conn.closing:
            try:
                line = conn.next_line(now)
            except ApiError as exc:
                conn.send(encode_error(None, exc.code, str(exc)))
                conn.closing = True
                self.stats.observe_request("unknown", exc.code)
                break
            if line is None:
                break
            link = self.engines.get(conn.fileno())
            if link is not None:
                self._engine_line(conn, link, line)
                continue
            response = self._handle(conn, line)
            if response is not None:
                conn.send(response)
        if conn.busy and len(conn.inbuf) > 4 * 64 * 1024:
            conn.closing = True    # pipelining megabytes behind a waiting request: drop it
        self._update_interest(conn)

    def _handle(self, conn: Connection, line: bytes) -> bytes | None:
        request_id = None
        op_label = "unknown"
        try:
            request = parse_request(line)
            request_id = request.id
            handler = self.api.ops.get(request.op)
            if handler is None:
                raise ApiError("invalid_input", f"unknown op {request.op[:64]!r}; known: {', '.join(self.api.ops)}")
            op_label = request.op
            result = handler(conn, request)
            if result is DEFERRED:
                self.stats.observe_request(op_label, "ok")
                return None
            self.stats.observe_request(op_label, "ok")
            return encode_result(request_id, result)
        except AgentcgError as exc:
            code = error_code(exc)
            request_id = getattr(exc, "request_id", request_id)
            self.stats.observe_request(op_label, code)
            return encode_error(request_id, code, str(exc))
        except Exception as exc:  # a bug must not take the daemon down: answer and log it (rate-limited)
            self._bad_requests.log(logging.ERROR, ("internal", conn.peer.uid), "internal error serving %s",
                                   op_label, exc_info=True, now=time.monotonic())
            self.stats.observe_request(op_label, "internal")
            return encode_error(request_id, "internal", f"internal error serving {op_label} "
                                                        f"({type(exc).__name__}); see the daemon's log")

    def _answer(self, conn: Connection, data: bytes) -> None:
        if conn.fileno() < 0 or self._conns.get(conn.fileno()) is not conn:
            return  # the client went away while waiting
        conn.busy = False
        conn.last_active = time.monotonic()
        conn.send(data)
        self._serve(conn)

    def _update_interest(self, conn: Connection) -> None:
        if conn in self._unflushed or self._conns.get(conn.fileno()) is not conn:
            return      # its answers go out at the end of the turn (_flush_turn), and this then
        if conn.closing and not conn.outbuf:
            self._drop(conn)
            return
        events = _IN | (select.EPOLLOUT if conn.outbuf else 0)
        if events != conn.interest:      # one epoll_ctl per change, not per request
            assert self._epoll is not None
            self._epoll.modify(conn.fileno(), events)
            conn.interest = events

    def _flush_turn(self) -> None:
        """The end of a loop turn: send every answer the turn made (the state they depend on
        is saved already), one send(2) per connection however many answers it got."""
        while self._unflushed:
            conn = self._unflushed.pop()
            if self._conns.get(conn.fileno()) is not conn:
                continue
            if not conn.flush():
                self._drop(conn)
            else:
                self._update_interest(conn)

    def _drop(self, conn: Connection) -> None:
        fd = conn.fileno()
        if fd >= 0 and self._conns.get(fd) is conn:
            del self._conns[fd]
            self._slots.release(conn.peer.uid)
            self._unregister(fd)
            link = self.engines.detach(fd)
            if link is not None:
                log.info("engine link %d (%s) closed; its %d requests are forgotten", link.link_id,
                         link.registration.engine_id if link.registration else "unregistered", len(link.requests))
        if conn in self._unflushed:       # answers of this turn: what the socket still takes
            self._unflushed.discard(conn)
            conn.flush()
        for waiters in self._waiters.values():
            waiters[:] = [w for w in waiters if w[0] is not conn]
        for call_id, (waiting, _, _, call) in list(self._admission.items()):
            if waiting is conn:          # the client gave up waiting: the call never ran
                self._cancel_admission(call)
                self._discard_pending(call)
        conn.close()

