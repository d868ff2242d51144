"""The daemon's ToolCallManager: the shared one, plus rebuilding calls an earlier daemon
began from its state file (ToolCallManager.adopt does the taking over)."""
from __future__ import annotations

from agentcg.controller.daemon.state import CallEntry
from agentcg.controller.sandbox import call_path, procs_files
from agentcg.controller.toolcall import ToolCall, ToolCallManager


class DaemonCalls(ToolCallManager):
    def adopt_entry(self, entry: CallEntry) -> ToolCall:
        """Rebuild a running call from the state file an earlier daemon left, and adopt it."""
        path = call_path(entry.sandbox, entry.call_id)
        call = ToolCall(
            call_id=entry.call_id, sandbox=entry.sandbox, tool=entry.tool, command=entry.command, path=path,
            cgroup_id=self.tree.cgroup_id(path), procs_files=procs_files(self.tree, path), priority=entry.priority,
            mem_hint_bytes=entry.mem_hint_bytes, start_monotonic_s=entry.start_monotonic_s,
            start_wall_s=entry.start_wall_s, created_sandbox=entry.created_sandbox, _tree=self.tree,
            returned_monotonic_s=entry.returned_monotonic_s, returned_wall_s=entry.returned_wall_s,
            exit_code=entry.exit_code, signal=entry.signal, grace_s=entry.grace_s,
        )
        self.adopt(call)
        return call
