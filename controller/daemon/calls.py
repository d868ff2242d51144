"""The daemon's ToolCallManager: the shared one, plus rebuilding calls an earlier daemon
began from its state file (ToolCallManager.adopt does the taking over), and finished
calls' cgroups removed off the loop (removals.py)."""
from __future__ import annotations

from typing import Callable

from agentcg.controller.daemon.removals import Removals
from agentcg.controller.daemon.state import CallEntry
from agentcg.controller.sandbox import call_path, procs_files
from agentcg.controller.toolcall import ToolCall, ToolCallManager


class DaemonCalls(ToolCallManager):
    removals: Removals | None = None
    lean_removal: Callable[[str], bool] | None = None    # sandbox -> its calls may go through `removals`

    def use_removals(self, poolable: Callable[[str], bool]) -> None:
        """Remove finished calls' cgroups in a thread (removals.py) for the sandboxes
        `poolable` accepts, when this tree's call directories are what `_procs_files` names
        (a plain v2 or hybrid tree below the wrapper: checked once here)."""
        base = getattr(self.tree, "base", self.tree)
        try:
            probe = call_path("probe", "tc-probe")
            dirs = [str(d) for d in base._hierarchy_dirs(probe)]      # type: ignore[attr-defined]
            ours = [str(p.parent) for p in procs_files(self.tree, probe)]
        except Exception:   # another kind of tree: every removal the ordinary way
            return
        if sorted(dirs) == sorted(ours):
            self.removals, self.lean_removal = Removals(self.state), poolable

    def _discard(self, sandbox: str, call_id: str, path: str, created_sandbox: bool,
                 cgroup_id: int | None = None, join_fds: list[int] | None = None) -> None:
        """A finished call of a lasting sandbox: its BPF entries now, its cgroup by the
        removals thread; anything else the ordinary way (ToolCallManager._discard)."""
        removals = self.removals
        if removals is None or created_sandbox or join_fds or not self.lean_removal(sandbox):  # type: ignore[misc]
            super()._discard(sandbox, call_id, path, created_sandbox, cgroup_id, join_fds)
            return
        if self.monitor is not None and cgroup_id is not None and cgroup_id in self.monitor.watched():
            self.monitor.forget(cgroup_id)
        files = self._procs_files(sandbox, call_id)
        # v2 last: should a v1 rmdir fail, the loop's CgroupTree.remove still finds the cgroup
        if not removals.queue(sandbox, call_id, [str(f.parent) for f in reversed(files)]):
            super()._discard(sandbox, call_id, path, created_sandbox, None, join_fds)

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
