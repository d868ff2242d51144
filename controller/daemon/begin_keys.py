"""Idempotent `toolcall.begin`: a client-chosen `request_key` makes a begin safe to resend.

A client that lost the answer to `toolcall.begin` (the daemon was killed or restarted
between reading the request and answering, or the connection broke) cannot know whether
the call was made. With a `request_key` (8..64 characters of [A-Za-z0-9_-], random per
call, e.g. 128 bits) it sends the same begin again, to the same or the next daemon:

- the key is saved with the call's state entry (`CallEntry.request_key`), so a daemon that
  adopted the call after a restart knows it too;
- a begin whose key matches a running call of the same uid answers with that call (its
  `call_id`, `cgroup_procs`, `cgroup_id`, `limits`, and `"repeated": true`): no second
  call is made. A call still waiting for admission in this daemon is answered once
  admitted, to the new request (the old connection's wait is taken over); a call adopted
  from an earlier daemon goes through this daemon's admission first (the earlier one
  never answered it, so its command has not started);
- a key of a call that already returned, or of another sandbox, is refused
  (`exists` / `invalid_input`): the client must pick a new key for a new call.
Without a key, begin behaves as before (and must not be resent).
"""
from __future__ import annotations

import re
from typing import Any

from agentcg.controller.daemon.server import ApiError, Connection, Request
from agentcg.errors import CgroupGone

KEY_RE = re.compile(r"[A-Za-z0-9_-]{8,64}")


class BeginKeys:
    def __init__(self, daemon: Any, deferred: object) -> None:
        self.d = daemon
        self.deferred = deferred
        self._readmitted: set[str] = set()    # adopted calls this daemon put through admission
        self._by_key: dict[str, str] | None = None   # key -> call id, built from the state at first use

    @staticmethod
    def read(op: str, args: dict[str, Any]) -> str | None:
        key = args.get("request_key")
        if key is None:
            return None
        if not isinstance(key, str) or not KEY_RE.fullmatch(key):
            raise ApiError("invalid_input", f"{op}: 'request_key' must be 8..64 characters of A-Z a-z 0-9 _ -, "
                                            f"got {key!r}; send a random one per call (or none)")
        return key

    def remember(self, call_id: str, key: str | None) -> None:
        entry = self.d.state.calls.get(call_id)
        if key is not None and entry is not None:
            entry.request_key = key
            self.d.state.calls[call_id] = entry      # assigned again: a journaled state saves it
            self._index()[key] = call_id

    def _index(self) -> dict[str, str]:
        if self._by_key is None:      # once per daemon: the keys of calls adopted at start-up
            self._by_key = {e.request_key: c for c, e in self.d.state.calls.items()
                            if getattr(e, "request_key", None)}
        return self._by_key

    def repeated(self, conn: Connection, req: Request, sandbox: str, key: str) -> Any:
        """The answer to a begin whose key names a running call, else None (a new call)."""
        d = self.d
        call_id = self._index().get(key)
        entry = d.state.calls.get(call_id) if call_id is not None else None
        if call_id is None or entry is None or entry.request_key != key:
            self._index().pop(key, None)      # its call was recorded: the key names nothing now
            return None
        if entry.owner_uid != conn.peer.uid:
            return None                       # another user's key: never theirs to take over
        try:
            call = d.calls.get(call_id)
        except CgroupGone:
            return None
        if entry.sandbox != sandbox:
            raise ApiError("invalid_input", f"{req.op}: request_key {key!r} belongs to call {call_id} of sandbox "
                                            f"{entry.sandbox!r}, not {sandbox!r}; use a new key per call")
        if call.has_returned:
            raise ApiError("exists", f"{req.op}: request_key {key!r} was call {call_id}, which has returned; "
                                     "a new call needs a new key")
        result = {"call_id": call.call_id, "cgroup_procs": [str(p) for p in call.procs_files],
                  "cgroup_id": call.cgroup_id, "limits": d.apply_call_limits(call), "repeated": True}
        admission = getattr(d, "_admission", {})
        if call_id in admission:               # still waiting: the answer goes to this request
            _, _, first_result, _ = admission[call_id]
            admission[call_id] = (conn, req.id, {**first_result, "repeated": True}, call)
            conn.busy = True
            return self.deferred
        if entry.adopted > 0 and call_id not in self._readmitted:
            self._readmitted.add(call_id)      # the earlier daemon never answered: admit it here
            return result if d.admit_or_wait(call, conn, req.id, result) else self.deferred
        return result
