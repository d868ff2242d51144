"""Inference engines attached to the daemon: the engine protocol's daemon side.

`EngineHub` holds every engine link (engine_link.py: one engine's registration, requests,
KV policy) keyed by the connection's fd, fans the daemon's hooks out to them, and splits
the host memory budget between the host KV pools and the sandboxes (HostMemoryBudget).
Every method answers [(link, directives)] for the daemon's loop to send; nothing here
touches a socket. The parts: engine_policy.py (which KV policy), engine_counters.py (what
is counted), engine_state.py (a link's requests, pure), engine_links.py (the daemon's side
of the connection), engine_metrics.py (the /metrics families).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Iterable

from agentcg.controller.daemon import engine_state as es
from agentcg.controller.daemon.engine_counters import EngineCounters
from agentcg.controller.daemon.engine_link import AppendEvent, CallsOf, EngineLink
from agentcg.controller.daemon.engine_policy import check_policy_name, make_kv_policy
from agentcg.engine_protocol import Directive
from agentcg.policies.kv.agentcg import HostMemoryBudget
from agentcg.policies.kv.predictor import ToolSignal, tool_key
from agentcg.records import ToolCallRecord

__all__ = ["EngineHub", "make_kv_policy", "read_records_tail"]   # make_kv_policy: service.py imports it from here

RECORDS_TAIL_BYTES = 1 << 20         # tool-call records read at attach to seed the predictor
SIGNAL_OF_ACTION = {"freeze": ToolSignal.FROZEN, "thaw": ToolSignal.THAWED,
                    "throttle": ToolSignal.THROTTLED, "relax": ToolSignal.THAWED}


class EngineHub:
    """Every engine link of the daemon, keyed by the connection's fd. Methods answer
    [(link, directives)] for the daemon to send."""

    def __init__(self, policy_name: str, max_links: int, max_requests: int,
                 host_reserve_bytes: int = 0, kv_floor_bytes: int = 0, calls_of: CallsOf | None = None,
                 append: AppendEvent | None = None, known_sandbox: Callable[[str], bool] | None = None) -> None:
        self.policy_name = check_policy_name(policy_name)
        self.calls_of = calls_of
        self.append = append                 # the daemon's event log (set by the daemon when it has one)
        self.known_sandbox = known_sandbox
        self.max_links, self.max_requests = max_links, max_requests
        self.host_reserve_bytes, self.kv_floor_bytes = host_reserve_bytes, kv_floor_bytes
        self.links: dict[int, EngineLink] = {}
        self.counters = EngineCounters()
        self._next_id = 0

    def attach(self, fd: int, history: Callable[[], Iterable[dict[str, Any]]] | None = None) -> EngineLink:
        self._next_id += 1
        link = EngineLink(self._next_id, fd, self.policy_name, self.counters, self.max_requests, self.calls_of,
                          append=self.append, known_sandbox=self.known_sandbox)
        if history is not None:
            link.learn_history(history())
        self.links[fd] = link
        self.counters.links_attached += 1
        return link

    def detach(self, fd: int) -> EngineLink | None:
        """The engine went away: its requests are forgotten."""
        return self.links.pop(fd, None)

    def get(self, fd: int) -> EngineLink | None:
        return self.links.get(fd)

    def next_wake_s(self) -> float | None:
        wakes = [link.wake_at_s for link in self.links.values() if link.wake_at_s is not None]
        return min(wakes) if wakes else None

    def _each(self, fn: Callable[[EngineLink], list[Directive]]) -> list[tuple[EngineLink, list[Directive]]]:
        out = []
        for link in list(self.links.values()):
            directives = fn(link)
            if directives:
                out.append((link, directives))
        return out

    def tool_call_began(self, sandbox: str, tool: str, command: str, call_id: str,
                        now_s: float) -> list[tuple[EngineLink, list[Directive]]]:
        key = tool_key(tool, command)
        return self._each(lambda link: link.tool_call_began(sandbox, key, call_id, now_s))

    def tool_call_ended(self, call_id: str, now_s: float) -> list[tuple[EngineLink, list[Directive]]]:
        return self._each(lambda link: link.tool_call_ended(call_id, now_s))

    def tool_signal(self, call_id: str, action_kind: str, now_s: float) -> list[tuple[EngineLink, list[Directive]]]:
        signal = SIGNAL_OF_ACTION.get(action_kind)
        if signal is None:
            return []
        return self._each(lambda link: link.tool_signal(call_id, signal, now_s))

    def learn(self, record: ToolCallRecord) -> None:
        for link in self.links.values():
            link.learn(record)

    def host_shares(self, host_budget_bytes: int | None, sandbox_bytes: int) -> dict[int, int] | None:
        """Each sharing link's host KV capacity (bytes) under the host memory budget, split
        in proportion to the host capacities the engines registered; None: no budget."""
        if host_budget_bytes is None:
            return None
        budget = HostMemoryBudget(host_budget_bytes, self.host_reserve_bytes, self.kv_floor_bytes)
        pool = budget.kv_capacity_bytes(sandbox_bytes)
        sharing = {fd: es.capacity_bytes(link.registration, es.Tier.HOST) for fd, link in self.links.items()
                   if link.registration is not None and link.shares_host_memory}
        total = sum(sharing.values())
        if not total:
            return {}
        return {fd: pool * cap // total for fd, cap in sharing.items()}

    def wake(self, now_s: float) -> list[tuple[EngineLink, list[Directive]]]:
        return self._each(lambda link: link.wake(now_s))

    def host_pressure(self, now_s: float, host_budget_bytes: int | None,
                      sandbox_bytes: int) -> list[tuple[EngineLink, list[Directive]]]:
        shares = self.host_shares(host_budget_bytes, sandbox_bytes) or {}
        return self._each(lambda link: link.host_pressure(now_s, shares.get(link.fd)))

    def sandbox_budget_bytes(self, host_budget_bytes: int | None, sandbox_bytes: int) -> int | None:
        """The host budget left to the sandboxes: the KV pools give back what they do not
        use and what they can spill to SSD, not more (HostMemoryBudget.sandbox_headroom)."""
        if host_budget_bytes is None:
            return None
        used = spillable = 0
        for link in self.links.values():
            if link.registration is not None and link.shares_host_memory:
                u, s = es.host_bytes(link.registration, link.requests.values())
                used, spillable = used + u, spillable + s
        if not used:
            return host_budget_bytes
        budget = HostMemoryBudget(host_budget_bytes, self.host_reserve_bytes, self.kv_floor_bytes)
        return sandbox_bytes + budget.sandbox_headroom_bytes(sandbox_bytes, used, spillable)

    def summaries(self) -> list[dict[str, Any]]:
        return [link.summary() for link in self.links.values()]


def read_records_tail(path: Path, limit_bytes: int = RECORDS_TAIL_BYTES) -> list[dict[str, Any]]:
    """The last records of the daemon's JSON-lines tool-call log (bounded read)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, 2)
            size = f.tell()
            f.seek(max(0, size - limit_bytes))
            data = f.read(limit_bytes)
    except OSError:
        return []
    lines = data.split(b"\n")
    if size > limit_bytes:
        lines = lines[1:]                  # the first one is cut
    out = []
    for line in lines:
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict):
            out.append(rec)
    return out
