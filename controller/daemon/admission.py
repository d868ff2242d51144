"""Admission (a mixin of service.Daemon): a `toolcall.begin` that would breach a budget
waits, visible in state and metrics, until the control core admits it or [policy]
max_wait_s passes; a call whose client left while it waited is discarded unrecorded.
"""
from __future__ import annotations

import logging
import time
from typing import Any

from agentcg.controller.daemon.server import Connection, encode_result
from agentcg.controller.toolcall import ToolCall
from agentcg.errors import AgentcgError

log = logging.getLogger("agentcg.daemon")


class DaemonAdmission:
    def admit_or_wait(self, call: ToolCall, conn: Connection, request_id: int | None, result: dict[str, Any]) -> bool:
        """`toolcall.begin`: True when the call may start now; else the answer comes once the
        policy admits it (bounded by [policy] max_wait_s), and the call shows as pending.
        With no budget to fit in (neither the sandbox's nor [policy] host_budget) there is
        nothing to admit against: it starts at once, without a step, so `toolcall.begin`
        costs the same with 10 or 1,600 calls running (bench/bench_daemon_scale.py)."""
        entry = self.state.sandboxes.get(call.sandbox)
        if self.config.policy.host_budget_bytes is None and (entry is None or entry.memory_budget_bytes is None):
            self.engine_tool_began(call)
            return True
        self.control.wait_for_admission(call)
        self._admission[call.call_id] = (conn, request_id, result, call)
        self._step(time.monotonic())
        if call.call_id in self._admission:
            conn.busy = True             # answered by _admitted, later
            return False
        return True

    def _admitted(self, call_id: str, reason: str, waited_s: float) -> None:
        entry = self._admission.pop(call_id, None)
        if entry is None:
            return
        conn, request_id, result, call = entry
        self.engine_tool_began(call)
        if conn.busy:                    # it waited: answer now (else admit_or_wait's return does)
            self._answer(conn, encode_result(request_id, {**result, "admission": {"waited_s": waited_s,
                                                                                  "reason": reason}}))

    def _cancel_admission(self, call: ToolCall) -> None:
        self.control.core.drop_pending(call.sandbox, call.call_id)
        self._admission.pop(call.call_id, None)

    def _expire_admissions(self, now: float) -> None:
        """A bound the policy cannot forget: past max_wait_s plus two ticks, it starts."""
        limit = self.config.policy.graduated.max_wait_s + 2 * self.config.policy.tick_s
        for key, pending in list(self.control.core.pending.items()):
            if now - pending.since_s > limit:
                self.control.core.drop_pending(*key)
                self._admitted(pending.call_id, "waited past [policy] max_wait_s; started anyway", now - pending.since_s)

    def _discard_pending(self, call: ToolCall) -> None:
        """A call whose client left while it waited for admission: it never ran, no record."""
        self.state.calls.pop(call.call_id, None)
        if self.owners is not None:
            self.owners.forget(call.call_id)
        try:
            self.calls.discard(call)
        except AgentcgError as exc:
            log.error("discarding tool call %s: %s", call.call_id, exc)
        self.save()
