"""Which cgroup a process is in, and whose it is (a sandbox, the engine, or other).

`/proc/<pid>/cgroup` lines are `hierarchy-id:controllers:path`; the v2 line is `0::path`.
On hybrid hosts a process's v2 path can be "/" while its v1 memory path says where it
was placed, so both are read and the first one below the agentcg root wins.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from agentcg.errors import AgentcgError
from agentcg.procfs import ProcFs


class ProcCgroups(NamedTuple):
    v2: str | None
    memory_v1: str | None


def read_proc_cgroups(pid: int, proc_root: str | Path = "/proc") -> ProcCgroups | None:
    """None when the process has gone (or /proc is not readable for it)."""
    procfs = ProcFs(proc_root)
    try:
        return ProcCgroups(procfs.v2_cgroup(pid), procfs.v1_cgroup(pid, "memory"))
    except AgentcgError:
        return None


@dataclass(frozen=True)
class CgroupOwners:
    """Maps cgroup paths to owners: `/<root>/<engine>...` -> "engine",
    `/<root>/<name>...` -> "sandbox:<name>", anything else -> "other"."""

    root: str = "agentcg"
    engine: str = "engine"

    def owner_of(self, cgroups: ProcCgroups | None) -> tuple[str, str | None]:
        """(owner, the cgroup path that decided it)."""
        if cgroups is None:
            return "gone", None
        for path in (cgroups.v2, cgroups.memory_v1):
            if not path:
                continue
            segments = [s for s in path.split("/") if s]
            if self.root in segments:
                rest = segments[segments.index(self.root) + 1:]
                if not rest:
                    return "other", path
                return ("engine" if rest[0] == self.engine else f"sandbox:{rest[0]}"), path
        return "other", cgroups.v2 or cgroups.memory_v1
