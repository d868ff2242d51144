"""The daemon's ToolCallManager: the shared one, plus adopting calls an earlier daemon began.

ToolCallManager (controller/toolcall.py) has no public way to take over a running call's
cgroup; `adopt` here builds the ToolCall from a state-file entry, re-watches it in eBPF
(a restarted daemon's programs count from zero: the record's eBPF fields then cover the
time since adoption) and rewrites its owner file with this daemon as the owner, so that
`reap_orphans()` of other agentcg processes leaves it alone.
"""
from __future__ import annotations

import os
from typing import Any

from agentcg.controller.daemon.state import CallEntry
from agentcg.controller.reaper import CallOwner, write_owner
from agentcg.controller.sandbox import call_path, procs_files
from agentcg.controller.toolcall import ToolCall, ToolCallManager
from agentcg.errors import BpfError, InvalidInput
from agentcg.records import ToolCallRecord


class DaemonCalls(ToolCallManager):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._notes: dict[str, tuple[str, str]] = {}     # call id -> (policy action, message)

    def note(self, call_id: str, action: str, message: str) -> None:
        """What a policy did to a running call; it goes into the call's record."""
        self._notes[call_id] = (action, message)

    def _record(self, call: ToolCall) -> ToolCallRecord:
        record = super()._record(call)
        note = self._notes.pop(call.call_id, None)
        if note is not None:
            record.policy_action, record.message = note
        return record

    def adopt(self, entry: CallEntry) -> ToolCall:
        path = call_path(entry.sandbox, entry.call_id)
        cgroup_id = self.tree.cgroup_id(path)
        call = ToolCall(
            call_id=entry.call_id, sandbox=entry.sandbox, tool=entry.tool, command=entry.command, path=path,
            cgroup_id=cgroup_id, procs_files=procs_files(self.tree, path), priority=entry.priority,
            mem_hint_bytes=entry.mem_hint_bytes, start_monotonic_s=entry.start_monotonic_s,
            start_wall_s=entry.start_wall_s, created_sandbox=entry.created_sandbox, _tree=self.tree,
            returned_monotonic_s=entry.returned_monotonic_s, returned_wall_s=entry.returned_wall_s,
            exit_code=entry.exit_code, signal=entry.signal, grace_s=entry.grace_s,
        )
        write_owner(CallOwner(entry.call_id, entry.sandbox, self.tree.root, os.getpid(), self._owner_ticks,
                              entry.start_wall_s, entry.created_sandbox), self.state)
        if self.monitor is not None:
            try:
                self.monitor.watch(cgroup_id)
            except (BpfError, InvalidInput):
                pass  # more calls than MAX_CGROUPS: tracked, eBPF fields stay unmeasured
        with self._lock:
            self._calls[call.call_id] = call
        return call
