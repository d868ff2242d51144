"""The control core's bounded event log (CONTRACTS interface 4, socket `events.since`).

Each event is `{"seq", "time_s", "kind", "sandbox", "call_id", "detail"}`; `seq` counts
from 1 and never repeats within a daemon's life. The ring keeps the last `capacity`
events; a reader that fell behind learns how many it missed (`dropped`), never gets a
silently shortened list. `time_s` is time.monotonic() (CLOCK_MONOTONIC, the clock of
bpf_ktime_get_ns), so kernel timestamps in `detail` compare with it directly.
"""
from __future__ import annotations

import collections
import time
from typing import Any

from agentcg.errors import InvalidInput

EVENT_KINDS = ("throttle", "freeze", "thaw", "relax", "kill", "protect", "limit", "admit_wait", "admit",
               "oom_kill", "reclaim_stall", "threshold", "kv_directive", "llm_request")
DEFAULT_CAPACITY = 4096
MAX_DETAIL_KEYS = 32
MAX_BATCH = 1024              # events one `since` answers at most


class EventLog:
    def __init__(self, capacity: int = DEFAULT_CAPACITY) -> None:
        if not 16 <= capacity <= 1 << 20:
            raise InvalidInput(f"event log capacity must be 16..1048576 events, got {capacity}")
        self._ring: collections.deque[dict[str, Any]] = collections.deque(maxlen=capacity)
        self._next = 1

    @property
    def next_seq(self) -> int:
        return self._next

    def append(self, kind: str, sandbox: str | None, call_id: str | None, detail: dict[str, Any] | None = None,
               *, time_s: float | None = None) -> int:
        """Add one event; returns its seq. The narrow interface engine links get."""
        if kind not in EVENT_KINDS:
            raise InvalidInput(f"event kind must be one of {', '.join(EVENT_KINDS)}, got {kind!r}")
        detail = dict(detail or {})
        if len(detail) > MAX_DETAIL_KEYS:
            raise InvalidInput(f"an event's detail holds at most {MAX_DETAIL_KEYS} keys, got {len(detail)}")
        seq = self._next
        self._next += 1
        self._ring.append({"seq": seq, "time_s": time.monotonic() if time_s is None else time_s, "kind": kind,
                           "sandbox": sandbox, "call_id": call_id, "detail": detail})
        return seq

    def since(self, seq: int, sandbox: str | None = None, limit: int = MAX_BATCH) -> dict[str, Any]:
        """Events with seq >= `seq` (of `sandbox` only, if given), oldest first.
        `next_seq` is where to ask next; `dropped` counts events >= `seq` the ring lost."""
        if isinstance(seq, bool) or not isinstance(seq, int) or seq < 0:
            raise InvalidInput(f"seq must be an integer >= 0, got {seq!r}")
        oldest = self._ring[0]["seq"] if self._ring else self._next
        dropped = max(0, oldest - max(seq, 1))
        out: list[dict[str, Any]] = []
        next_seq = self._next
        for event in self._ring:
            if event["seq"] < seq:
                continue
            if len(out) >= limit:
                next_seq = event["seq"]
                break
            if sandbox is None or event["sandbox"] == sandbox:
                out.append(event)
        return {"events": out, "next_seq": next_seq, "dropped": dropped}
