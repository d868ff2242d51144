"""One CgroupTree over agentcg's own root plus adopted containers.

The daemon, its policies, metrics and tool calls address sandboxes by path ("S",
"S/agent", "S/tools/<id>") on one tree. `MountedTree` keeps that: a path whose first
segment is an adopted sandbox goes to the tree rooted at the container's cgroup
(`container_cgroups.container_tree`), the rest to agentcg's own tree. So an adopted
container is a sandbox like any other to everything above the cgroup layer, and
"S" itself is the container's cgroup (its limits are the sandbox's budget), which this
tree never removes.
"""
from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, Sequence

from agentcg.controller.cgroup import CgroupTree
from agentcg.errors import InvalidInput


class MountedTree(CgroupTree):
    def __init__(self, base: CgroupTree) -> None:
        self.base = base
        self.kind = base.kind
        self.root = base.root
        self._mounts: dict[str, CgroupTree] = {}
        self._lock = threading.Lock()

    # ---- mounts -------------------------------------------------------------------
    def mount(self, sandbox: str, tree: CgroupTree) -> None:
        with self._lock:
            if sandbox in self._mounts:
                raise InvalidInput(f"sandbox {sandbox!r} is adopted already")
            self._mounts[sandbox] = tree

    def unmount(self, sandbox: str) -> None:
        with self._lock:
            self._mounts.pop(sandbox, None)

    def mounted(self) -> dict[str, CgroupTree]:
        with self._lock:
            return dict(self._mounts)

    def _route(self, path: str) -> tuple[CgroupTree, str]:
        if not path:
            return self.base, path
        head, _, rest = path.partition("/")
        tree = self._mounts.get(head)
        return (tree, rest) if tree is not None else (self.base, path)

    # ---- what the base tree's users read directly -----------------------------------
    @property
    def v1_mounts(self) -> dict[str, Path]:
        return getattr(self.base, "v1_mounts", {})

    @property
    def capabilities(self) -> frozenset[str]:
        return self.base.capabilities

    def _hierarchy_bases(self) -> list[Path]:
        return self.base._hierarchy_bases()  # type: ignore[attr-defined]

    # ---- the interface, routed ------------------------------------------------------
    def create(self, path: str, exist_ok: bool = False) -> None:
        tree, rest = self._route(path)
        if tree is not self.base and rest == "":
            if exist_ok:
                return
            raise InvalidInput(f"sandbox {path!r} is an adopted container: its cgroup exists already")
        tree.create(rest, exist_ok)

    def remove(self, path: str, timeout_s: float = 5.0) -> None:
        tree, rest = self._route(path)
        if tree is not self.base and rest == "":
            raise InvalidInput(f"sandbox {path!r} is an adopted container: release it (`agentcg sandbox release "
                               f"{path}`) instead of removing it")
        tree.remove(rest, timeout_s)

    def exists(self, path: str) -> bool:
        if path == "" and self.mounted():
            return True      # adopted sandboxes are there even before agentcg's own root is made
        tree, rest = self._route(path)
        return tree.exists(rest)

    def children(self, path: str = "") -> list[str]:
        if path == "":
            return sorted(set(self.base.children("") if self.base.exists("") else []) | set(self.mounted()))
        tree, rest = self._route(path)
        return tree.children(rest)

    def pids(self, path: str) -> list[int]:
        tree, rest = self._route(path)
        return tree.pids(rest)

    def is_populated(self, path: str) -> bool:
        tree, rest = self._route(path)
        return tree.is_populated(rest)

    def spawn(self, path: str, argv: Sequence[str], **popen_kwargs: Any):  # type: ignore[override]
        tree, rest = self._route(path)
        return tree.spawn(rest, argv, **popen_kwargs)

    def attach(self, path: str, pid: int) -> None:
        tree, rest = self._route(path)
        tree.attach(rest, pid)

    def cgroup_id(self, path: str) -> int:
        tree, rest = self._route(path)
        return tree.cgroup_id(rest)

    def set_memory(self, path: str, **kwargs: Any) -> None:  # type: ignore[override]
        tree, rest = self._route(path)
        tree.set_memory(rest, **kwargs)

    def set_cpu(self, path: str, **kwargs: Any) -> None:  # type: ignore[override]
        tree, rest = self._route(path)
        tree.set_cpu(rest, **kwargs)

    def set_pids_max(self, path: str, value: Any) -> None:
        tree, rest = self._route(path)
        tree.set_pids_max(rest, value)

    def freeze(self, path: str) -> None:
        tree, rest = self._route(path)
        tree.freeze(rest)

    def thaw(self, path: str) -> None:
        tree, rest = self._route(path)
        tree.thaw(rest)

    def is_frozen(self, path: str) -> bool:
        tree, rest = self._route(path)
        return tree.is_frozen(rest)

    def kill(self, path: str) -> None:
        tree, rest = self._route(path)
        if tree is not self.base and rest == "":
            raise InvalidInput(f"sandbox {path!r} is an adopted container: agentcg kills tool calls, never the "
                               "container itself (stop it with its runtime)")
        tree.kill(rest)

    def memory_current(self, path: str) -> int:
        tree, rest = self._route(path)
        return tree.memory_current(rest)

    def memory_peak(self, path: str) -> int:
        tree, rest = self._route(path)
        return tree.memory_peak(rest)

    def memory_events(self, path: str):  # type: ignore[override]
        tree, rest = self._route(path)
        return tree.memory_events(rest)

    def memory_stat(self, path: str):  # type: ignore[override]
        tree, rest = self._route(path)
        return tree.memory_stat(rest)

    def cpu_stat(self, path: str):  # type: ignore[override]
        tree, rest = self._route(path)
        return tree.cpu_stat(rest)

    def pressure(self, path: str, resource: str = "memory"):  # type: ignore[override]
        tree, rest = self._route(path)
        return tree.pressure(rest, resource)

    def pressure_trigger(self, path: str, resource: str = "memory", kind: str = "some",  # type: ignore[override]
                         stall_s: float = 0.15, window_s: float = 1.0):
        tree, rest = self._route(path)
        return tree.pressure_trigger(rest, resource, kind, stall_s, window_s)

    def cgroup_dir(self, path: str, hierarchy: str = "v2") -> Path:
        tree, rest = self._route(path)
        return tree.cgroup_dir(rest, hierarchy)

    def __repr__(self) -> str:
        return f"MountedTree({self.base!r}, mounts={sorted(self.mounted())})"
