"""The daemon side of `agentcg profile`: the sandbox registered with the daemon so that its
policy acts on it, and the daemon's event log (CONTRACTS interface 4, `events.since`, see
docs/daemon.md) turned into rows of the trace's `events` and `llm_requests` tables.

The log's times are the daemon's CLOCK_MONOTONIC (controller/core/events.py); profile runs
on the same host, so they convert to epoch seconds by the offset between the two clocks now.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable

from agentcg.profiler import trace as tr

DAEMON_POLL_S = 0.25
DAEMON_MAX_FAILURES = 3          # consecutive failed polls before the daemon is given up on
MAX_PAGES_PER_POLL = 64          # bounded catch-up when the daemon has a backlog
POLICY_KINDS = frozenset({"throttle", "freeze", "thaw", "kill", "admit_wait", "admit", "unthrottle"})
BPF_KINDS = frozenset({"oom_kill", "reclaim_stall"})   # recorded from profile's own eBPF monitor
EPOCH_FLOOR_S = 1e9               # 2001: a smaller time is a CLOCK_MONOTONIC reading, not epoch seconds


def wall_of(monotonic_s: float) -> float:
    """Epoch seconds of a CLOCK_MONOTONIC reading of this host (eBPF events, the daemon's log)."""
    return time.time() - (time.monotonic() - monotonic_s)


def epoch_of(value: float) -> float:
    """Epoch seconds of a time that is either epoch seconds or this host's monotonic clock."""
    return value if value >= EPOCH_FLOOR_S else wall_of(value)


class DaemonLink:
    """The daemon a profiled session reports to: the sandbox is registered there
    (`sandbox.create`, so the daemon's policy sees it and acts on the calls begun through
    it) and removed there at the end; its event log fills the trace."""

    def __init__(self, socket: Path) -> None:
        from agentcg.controller.client import Client

        self.socket = socket
        self.client = Client(mode="daemon", socket=socket)
        self.registered: str | None = None
        self.error: str | None = None

    def register(self, sandbox: str, memory_budget_bytes: int | None) -> None:
        from agentcg.errors import AgentcgError

        args: dict[str, Any] = {"name": sandbox}
        if memory_budget_bytes is not None:
            args["memory_budget_bytes"] = memory_budget_bytes
        try:
            self.client.request("sandbox.create", args)
            self.registered = sandbox
        except AgentcgError as exc:     # recorded and warned; the session runs unregistered
            self.error = f"sandbox.create: {exc}"

    def unregister(self) -> None:
        from agentcg.errors import AgentcgError

        if self.registered is None:
            return
        try:
            self.client.request("sandbox.remove", {"name": self.registered})
        except AgentcgError as exc:
            self.error = self.error or f"sandbox.remove: {exc}"
        self.registered = None

    def close(self) -> None:
        self.client.close()


def open_daemon(choice: Path | None | bool) -> DaemonLink | None:
    socket = _daemon_socket(choice)
    return DaemonLink(socket) if socket is not None else None


class DaemonEvents:
    """Polls the daemon's event log for one sandbox (CONTRACTS interface 4)."""

    def __init__(self, client: Any, sandbox: str, record_event: Callable[..., None],
                 add_llm: Callable[[dict[str, Any]], None], *, skip_kinds: frozenset[str] = BPF_KINDS) -> None:
        self._client = client
        self.sandbox = sandbox
        self._record_event = record_event
        self._add_llm = add_llm
        self._skip = skip_kinds
        self._seq = 0
        self._next_poll = 0.0
        self._failures = 0
        self.events = 0
        self.llm_requests = 0
        self.dropped = 0
        self.error: str | None = None
        self.kinds: dict[str, int] = {}

    def close(self) -> None:
        close = getattr(self._client, "close", None)
        if close is not None:
            close()

    @property
    def alive(self) -> bool:
        return self._failures < DAEMON_MAX_FAILURES

    def step(self, force: bool = False) -> None:
        now = time.monotonic()
        if not self.alive or (not force and now < self._next_poll):
            return
        self._next_poll = now + DAEMON_POLL_S
        from agentcg.errors import AgentcgError

        for _ in range(MAX_PAGES_PER_POLL):
            try:
                reply = self._client.request("events.since", {"seq": self._seq, "sandbox": self.sandbox})
            except AgentcgError as exc:
                self._failures += 1
                self.error = str(exc)
                return
            self._failures = 0
            events = reply.get("events") if isinstance(reply, dict) else None
            if not isinstance(events, list):
                self.error = f"events.since: unexpected reply {str(reply)[:200]}"
                self._failures = DAEMON_MAX_FAILURES
                return
            self.dropped += int(reply.get("dropped") or 0)
            for event in events:
                if isinstance(event, dict):
                    self._take(event)
            next_seq = reply.get("next_seq")
            if not isinstance(next_seq, int) or next_seq <= self._seq or not events:
                if isinstance(next_seq, int) and next_seq > self._seq:
                    self._seq = next_seq
                return
            self._seq = next_seq

    def _take(self, event: dict[str, Any]) -> None:
        kind = str(event.get("kind") or "unknown")
        if event.get("sandbox") not in (None, self.sandbox):
            return
        self.kinds[kind] = self.kinds.get(kind, 0) + 1
        detail = event.get("detail") if isinstance(event.get("detail"), dict) else {}
        # the daemon's log is on CLOCK_MONOTONIC (controller/core/events.py): same host, same clock
        time_s = epoch_of(float(event["time_s"])) if isinstance(event.get("time_s"), (int, float)) else time.time()
        if kind == "llm_request":
            self._add_llm(llm_row_of(detail, time_s))
            self.llm_requests += 1
            return
        if kind in self._skip:
            return
        call_id = event.get("call_id") if isinstance(event.get("call_id"), str) else None
        amount = detail.get("amount_bytes", detail.get("bytes"))
        amount = amount if isinstance(amount, int) and not isinstance(amount, bool) else None
        if kind in POLICY_KINDS:
            row_kind, action = tr.EVENT_POLICY_ACTION, kind
        elif kind == "kv_directive":
            row_kind, action = tr.EVENT_KV_DECISION, str(detail.get("directive") or detail.get("action") or "directive")
        else:
            row_kind, action = kind, detail.get("action") if isinstance(detail.get("action"), str) else None
        self._record_event(time_s, row_kind, call_id=call_id, action=action, amount_bytes=amount,
                           detail=json.dumps({**detail, "source": "daemon", "seq": event.get("seq")},
                                             sort_keys=True, default=str))
        self.events += 1


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def llm_row_of(detail: dict[str, Any], time_s: float) -> dict[str, Any]:
    """An llm_requests row from an engine link's "llm_request" event detail."""
    start = epoch_of(detail["start_s"]) if isinstance(detail.get("start_s"), (int, float)) else None
    end = epoch_of(detail["end_s"]) if isinstance(detail.get("end_s"), (int, float)) else None
    duration = detail.get("duration_s")
    if not isinstance(duration, (int, float)):
        duration = end - start if start is not None and end is not None else None
    context = _int(detail.get("context_tokens"))
    return {"request_id": str(detail.get("request_id") or f"engine-{time_s:.6f}"),
            "time_s": float(start if start is not None else time_s),
            "model": detail.get("model") if isinstance(detail.get("model"), str) else None,
            "input_tokens": context if context is not None else _int(detail.get("input_tokens")),
            "output_tokens": _int(detail.get("output_tokens")),
            "cache_read_tokens": _int(detail.get("cached_tokens")), "duration_s": duration,
            "usage_format": "engine"}


def _daemon_socket(choice: Path | None | bool) -> Path | None:
    if choice is False:
        return None
    if choice is None or choice is True:
        from agentcg.controller.client import socket_path

        path = socket_path()
        return path if path.exists() else None
    return Path(choice)
