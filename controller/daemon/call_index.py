"""The daemon's running calls, indexed, so what the loop asks of them per turn and per
`toolcall.begin` costs the same with 10 or 10,000 calls running (docs/daemon.md, "Scale").

`CallTable` is the manager's call-id -> ToolCall dict, with three indexes kept on every
set and removal: per sandbox (how many calls, which of them returned), by cgroup id (what
the kernel reports a threshold crossing for), and the returned calls (those waiting to be
finished: the loop polls fast while there are any, and finishing looks at them only).
`IndexedCalls` is the daemon's manager over it: a call's "returned" state changes only
through `returned()` and `resumed()`, which keep the indexes right.
"""
from __future__ import annotations

import logging
import time
from typing import Any

from agentcg.controller.daemon.calls import DaemonCalls
from agentcg.controller.toolcall import ToolCall
from agentcg.errors import AgentcgError
from agentcg.records import ToolCallRecord

log = logging.getLogger("agentcg.toolcall")


class CallTable(dict):
    """call id -> ToolCall, with its indexes (see the module's docstring)."""

    def __init__(self, calls: dict[str, ToolCall] | None = None) -> None:
        super().__init__()
        self.by_cgroup: dict[int, ToolCall] = {}
        self.in_sandbox: dict[str, dict[str, ToolCall]] = {}   # sandbox -> its calls, in the order they came
        self.versions: dict[str, int] = {}                    # sandbox -> changed when its calls change
        self._clock = 0
        self.returned: dict[str, ToolCall] = {}          # call id -> a call that returned
        self.returned_in: dict[str, int] = {}             # sandbox -> how many of its calls returned
        for call in (calls or {}).values():
            self[call.call_id] = call

    def __setitem__(self, call_id: str, call: ToolCall) -> None:
        if call_id in self:
            self._unindex(dict.__getitem__(self, call_id))
        super().__setitem__(call_id, call)
        self.by_cgroup[call.cgroup_id] = call
        self.in_sandbox.setdefault(call.sandbox, {})[call_id] = call
        self.changed(call.sandbox)
        if call.has_returned:
            self.mark_returned(call)

    def __delitem__(self, call_id: str) -> None:
        self._unindex(dict.__getitem__(self, call_id))
        super().__delitem__(call_id)

    def pop(self, call_id: str, *default: Any) -> Any:
        if call_id in self:
            self._unindex(dict.__getitem__(self, call_id))
        return super().pop(call_id, *default)

    def popitem(self) -> tuple[str, ToolCall]:
        call_id, call = super().popitem()
        self._unindex(call)
        return call_id, call

    def clear(self) -> None:
        super().clear()
        self.by_cgroup.clear()
        self.in_sandbox.clear()
        self.versions.clear()
        self.returned.clear()
        self.returned_in.clear()

    def setdefault(self, call_id: str, default: Any = None) -> Any:
        if call_id not in self:
            self[call_id] = default
        return self[call_id]

    def update(self, *args: Any, **kwargs: Any) -> None:
        for call_id, call in dict(*args, **kwargs).items():
            self[call_id] = call

    def mark_returned(self, call: ToolCall) -> None:
        if call.call_id not in self.returned and dict.get(self, call.call_id) is call:
            self.returned[call.call_id] = call
            self.returned_in[call.sandbox] = self.returned_in.get(call.sandbox, 0) + 1

    def unmark_returned(self, call: ToolCall) -> None:
        if self.returned.get(call.call_id) is call:
            del self.returned[call.call_id]
            self._decrement(self.returned_in, call.sandbox)

    def changed(self, sandbox: str) -> None:
        """A call of `sandbox` came, went or changed in place (tool, start, hint)."""
        self._clock += 1
        self.versions[sandbox] = self._clock

    def _unindex(self, call: ToolCall) -> None:
        if self.by_cgroup.get(call.cgroup_id) is call:
            del self.by_cgroup[call.cgroup_id]
        calls = self.in_sandbox.get(call.sandbox)
        if calls is not None and calls.get(call.call_id) is call:
            del calls[call.call_id]
            if calls:
                self.changed(call.sandbox)
            else:
                del self.in_sandbox[call.sandbox]
                self.versions.pop(call.sandbox, None)
        self.unmark_returned(call)

    @staticmethod
    def _decrement(counts: dict[str, int], key: str) -> None:
        n = counts.get(key, 0) - 1
        if n > 0:
            counts[key] = n
        else:
            counts.pop(key, None)


class IndexedCalls(DaemonCalls):
    """The daemon's manager: DaemonCalls over a CallTable, and the questions it answers."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._calls: CallTable = CallTable(self._calls)

    # ---- a call's returned state -------------------------------------------------------
    def returned(self, call: ToolCall, exit_code: int | None = None, signal: int | None = None, *,
                 at_monotonic_s: float | None = None) -> None:
        super().returned(call, exit_code, signal, at_monotonic_s=at_monotonic_s)
        if call.has_returned:
            with self._lock:
                self._calls.mark_returned(call)

    def resumed(self, call: ToolCall) -> None:
        """The call has not returned after all (an adopted `sandbox exec` command that still
        runs, exec_watch_saved.py): it is running again, with no exit status."""
        call.returned_monotonic_s = call.returned_wall_s = call.exit_code = call.signal = None
        with self._lock:
            self._calls.unmark_returned(call)

    # ---- questions, each O(1) or O(returned calls) -----------------------------------------
    def count(self) -> int:
        return len(self._calls)

    def has(self, call_id: str) -> bool:
        return call_id in self._calls

    def running_in(self, sandbox: str) -> int:
        """Calls of `sandbox` that have not returned."""
        table = self._calls
        return len(table.in_sandbox.get(sandbox, ())) - table.returned_in.get(sandbox, 0)

    def calls_of(self, sandbox: str) -> list[ToolCall]:
        """The calls of `sandbox`, returned or not (a returned one holds its cgroup until finished)."""
        with self._lock:
            return list(self._calls.in_sandbox.get(sandbox, {}).values())

    def versions(self) -> dict[str, int]:
        """sandbox -> a number that changes whenever its calls do (DaemonControl.inputs)."""
        return self._calls.versions

    def changed(self, call: ToolCall) -> None:
        """`call`'s tool, command, start or hint was changed in place (a `sandbox exec` spare
        taken by a command): the next snapshot takes them again."""
        with self._lock:
            self._calls.changed(call.sandbox)

    def some(self, call_ids: Any) -> list[ToolCall]:
        """The running calls among `call_ids`."""
        table = self._calls
        return [call for call in map(table.get, call_ids) if call is not None]

    def any_returned(self) -> bool:
        return bool(self._calls.returned)

    def returned_calls(self) -> list[ToolCall]:
        with self._lock:
            return list(self._calls.returned.values())

    def of_cgroup(self, cgroup_id: int) -> ToolCall | None:
        return self._calls.by_cgroup.get(cgroup_id)

    def finish_due(self, now_s: float | None = None) -> list[ToolCallRecord]:
        """Finish every returned call whose cgroup is empty or whose grace period is over
        (ToolCallManager.finish_due, over the returned calls only: the others are not due)."""
        if not self._calls.returned:
            return []
        now_s = time.monotonic() if now_s is None else now_s
        done = []
        for call in self.returned_calls():
            if not call.has_returned:             # set back by hand, not through resumed()
                with self._lock:
                    self._calls.unmark_returned(call)
            elif not self._populated(call) or now_s >= call.returned_monotonic_s + call.grace_s:
                try:
                    done.append(self._finish(call))
                except AgentcgError as exc:       # one stuck call must not lose the others' records
                    log.error("tool call %s/%s could not be finished: %s", call.sandbox, call.call_id, exc)
        return done
