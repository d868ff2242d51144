"""What the daemon keeps per adopted container, and its file `<state_dir>/containers.json`
(rewritten whole with rename, so a `kill -9` leaves the old or the new file)."""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from agentcg.controller.autodetect import ToolMatcher
from agentcg.controller.container_cgroups import ContainerCgroup
from agentcg.controller.container_nest import Nesting
from agentcg.errors import AgentcgError
from agentcg.procfs import ProcFs
from agentcg.safefile import atomic_write

log = logging.getLogger("agentcg.daemon.containers")

STATE_FILE = "containers.json"
STATE_VERSION = 1
MAX_ADOPTED = 256
UNLIMITED_BYTES = 1 << 60            # v1 reports "no limit" as PAGE_COUNTER_MAX pages
PROC = ProcFs()


@dataclass
class Adopted:
    name: str
    cgroup: ContainerCgroup
    nesting: Nesting
    runtime: str                      # podman | docker | kubernetes | systemd | unknown
    container_id: str | None
    init_pid: int | None
    init_start_ticks: int | None
    memory_budget_bytes: int | None
    budget_from: str                  # "given" | "container" | "none"
    tools: tuple[str, ...] | None = None     # globs of the agent's commands that count (None: the defaults)
    exclude: tuple[str, ...] = ()
    calls: dict[str, tuple[int, int]] = field(default_factory=dict)   # running call -> its main (pid, ticks)
    root_id: int = 0
    agent_id: int = 0
    tree: Any = field(default=None, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "cgroup": self.cgroup.to_dict(), "nesting": self.nesting.to_dict(),
                "runtime": self.runtime, "container_id": self.container_id, "init_pid": self.init_pid,
                "init_start_ticks": self.init_start_ticks, "memory_budget_bytes": self.memory_budget_bytes,
                "budget_from": self.budget_from, "tools": list(self.tools) if self.tools is not None else None,
                "exclude": list(self.exclude), "calls": {k: list(v) for k, v in self.calls.items()}}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Adopted":
        """One saved entry (load_adopted); KeyError, TypeError or ValueError when malformed."""
        entry = cls(str(data["name"]), ContainerCgroup.from_dict(data["cgroup"]),
                    Nesting.from_dict(data.get("nesting", {})), str(data.get("runtime", "unknown")),
                    data.get("container_id"), data.get("init_pid"), data.get("init_start_ticks"),
                    data.get("memory_budget_bytes"), str(data.get("budget_from", "none")),
                    tuple(data["tools"]) if data.get("tools") is not None else None,
                    tuple(data.get("exclude") or ()))
        entry.calls = {str(k): (int(v[0]), int(v[1])) for k, v in dict(data.get("calls") or {}).items()}
        return entry

    @property
    def matcher(self) -> ToolMatcher:
        return ToolMatcher(self.tools, self.exclude) if self.tools is not None else ToolMatcher(exclude=self.exclude)

    def alive(self) -> bool:
        if self.tree is None or not self.tree.root_dir.is_dir():
            return False
        if self.init_pid is None:
            return True
        return PROC.is_alive(self.init_pid, self.init_start_ticks)


def memory_limit(tree: Any) -> int | None:
    """The container's own memory limit (v2 memory.max, v1 memory.limit_in_bytes), None if unlimited."""
    try:
        if tree.kind == "v2":
            text = (tree.root_dir / "memory.max").read_text().strip()
        else:
            text = (tree.cgroup_dir("", "memory") / "memory.limit_in_bytes").read_text().strip()
    except (OSError, AgentcgError):
        return None
    if text == "max":
        return None
    value = int(text)
    return None if value >= UNLIMITED_BYTES else value


def load_adopted(path: Path) -> list[dict[str, Any]]:
    """The saved entries (as dicts; `restore` rebuilds and checks each), [] without a file."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return []
    except (OSError, ValueError) as exc:
        log.error("%s unreadable (%s); adopted containers are not re-adopted", path, exc)
        return []
    if not isinstance(data, dict) or data.get("version") != STATE_VERSION:
        return []
    return [c for c in data.get("containers", []) if isinstance(c, dict)][:MAX_ADOPTED]


def save_adopted(path: Path, entries: Iterable[Adopted]) -> None:
    data = {"version": STATE_VERSION, "containers": [e.to_dict() for e in entries]}
    path.parent.mkdir(parents=True, exist_ok=True)
    # as the daemon's state.json: never through a planted link, not fsynced (rewritten often)
    atomic_write(path, json.dumps(data, sort_keys=True), 0o600, fsync=False)
