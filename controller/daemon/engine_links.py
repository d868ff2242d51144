"""Engine links (docs/daemon-protocol.md, "Engine links"): a connection that sent
`engine.attach` carries engine-protocol lines both ways; tool calls starting, ending and
being frozen or throttled become directives for the engine that serves their sandbox.
A mixin of service.Daemon (the EngineHub in engine.py does the bookkeeping, engine_link.py
each engine's part).
"""
from __future__ import annotations

import logging
import time

from agentcg.controller.daemon.engine import read_records_tail
from agentcg.controller.daemon.engine_link import EngineLink
from agentcg.controller.daemon.server import ApiError, Connection, encode_error
from agentcg.controller.toolcall import ToolCall
from agentcg.engine_protocol import Directive, decode as decode_engine_line, encode as encode_engine_line
from agentcg.errors import AgentcgError, ProtocolError
from agentcg.policies.kv.predictor import ToolSignal

log = logging.getLogger("agentcg.daemon")


class EngineLinks:
    def attach_engine(self, conn: Connection) -> EngineLink:
        """`engine.attach`: from now on `conn` speaks the engine protocol."""
        if len(self.engines.links) >= self.config.engine.max_links:
            raise ApiError("busy", f"{self.config.engine.max_links} engines are attached ([engine] max_links)")
        link = self.engines.attach(conn.fileno(), history=lambda: read_records_tail(self.config.records_path))
        log.info("engine link %d attached (pid %d, uid %d), KV policy %s", link.link_id, conn.peer.pid,
                 conn.peer.uid, link.policy_name)
        return link

    def _engine_line(self, conn: Connection, link: EngineLink, line: bytes) -> None:
        try:
            directives = link.on_message(decode_engine_line(line), time.monotonic())
        except ProtocolError as exc:
            self.engines.counters.protocol_errors += 1
            conn.send(encode_error(None, "invalid_input", f"engine protocol: {exc}; the connection is closed"))
            conn.closing = True
            return
        self._send_directives([(link, directives)], update=False)

    def _send_directives(self, batches: list[tuple[EngineLink, list[Directive]]], update: bool = True) -> None:
        """Write directives to their engines (asynchronously: the loop flushes the rest)."""
        for link, directives in batches:
            conn = self._conns.get(link.fd)
            if conn is None or self.engines.get(link.fd) is not link:
                continue
            for directive in directives:
                try:
                    conn.send(encode_engine_line(directive))
                except ProtocolError as exc:      # a policy's directive too large to encode
                    log.error("engine link %d: %s", link.link_id, exc)
            if update:
                self._update_interest(conn)

    def engine_tool_began(self, call: ToolCall) -> None:
        if self.engines.links:   # a bug here must not fail the tool call: guarded
            self._guarded(lambda: self._send_directives(self.engines.tool_call_began(
                call.sandbox, call.tool, call.command, call.call_id, time.monotonic())))

    def _engine_call_ended(self, call_id: str) -> None:
        if self.engines.links:
            self._guarded(lambda: self._send_directives(self.engines.tool_call_ended(call_id, time.monotonic())))

    def _calls_of(self, sandbox: str) -> list[tuple[str, ToolSignal | None]]:
        """The running tool calls of `sandbox`, oldest first, with what a policy did to them."""
        core = self.control.core
        calls = sorted((c for c in self.calls.running() if c.sandbox == sandbox and not c.has_returned
                        and (c.sandbox, c.call_id) not in core.pending), key=lambda c: c.start_monotonic_s)
        return [(c.call_id, ToolSignal.FROZEN if (sandbox, c.call_id) in core.frozen else
                 ToolSignal.THROTTLED if (sandbox, c.call_id) in core.throttle else None) for c in calls]

    def _sandbox_bytes(self) -> int:
        try:
            return self.tree.memory_current("")
        except AgentcgError:
            return 0

