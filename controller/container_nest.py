"""Nesting agentcg's leaves below a container's cgroup, and taking them away again.

    nesting = nest(tree)     # <container>/agent (its processes), <container>/tools
    ...
    unnest(tree, nesting)    # processes back in <container>, only what agentcg made removed

cgroup v2 allows processes only in leaves once a cgroup hands controllers to its children
(the no-internal-process rule), so the container's processes move into `agent` first and
only then are memory, cpu and pids enabled in the container's `cgroup.subtree_control`
(the docker-in-docker entrypoint does the same). On hybrid hosts the v2 tree has no
controllers to enable and the v1 hierarchies have no such rule; the processes move in
every hierarchy agentcg joins (memory, cpu, cpuacct, pids) and stay in the runtime's
cgroups of the others (devices, freezer, cpuset, blkio), which agentcg never touches.
Runc sets Delegate=yes on systemd container scopes, so systemd leaves these children alone.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from agentcg.controller.cgroup import _fs
from agentcg.controller.cgroup.v2 import V2Tree
from agentcg.errors import CgroupBusy, CgroupExists, CgroupGone

AGENT, TOOLS = "agent", "tools"
MOVE_ROUNDS = 32                     # a forking container may add processes while we move them
V2_CONTROLLERS = ("memory", "cpu", "pids")


@dataclass
class Nesting:
    made: list[str] = field(default_factory=list)      # leaves agentcg created ("agent", "tools")
    enabled: list[str] = field(default_factory=list)   # v2 controllers agentcg enabled in the container

    def to_dict(self) -> dict[str, list[str]]:
        return {"made": list(self.made), "enabled": list(self.enabled)}

    @classmethod
    def from_dict(cls, data: dict) -> "Nesting":
        return cls([str(x) for x in data.get("made", [])], [str(x) for x in data.get("enabled", [])])


def make_leaf(tree: V2Tree, leaf: str) -> bool:
    """mkdir `leaf` below the container in every hierarchy (no controller is enabled: the
    container's cgroup may still hold processes); True when agentcg made any of them."""
    return _mkdir_all(tree._hierarchy_dirs(leaf))


def nest(tree: V2Tree) -> Nesting:
    """Create agent and tools (where missing), move the container's processes into agent,
    enable the v2 controllers the container has. Undone on failure."""
    nesting = Nesting()
    try:
        for leaf in (AGENT, TOOLS):
            if make_leaf(tree, leaf):
                nesting.made.append(leaf)
        move_all(tree, "", AGENT)
        nesting.enabled = enable_controllers(tree)
    except BaseException:
        unnest(tree, nesting)
        raise
    return nesting


def unnest(tree: V2Tree, nesting: Nesting) -> int:
    """Move every process below agentcg's leaves back into the container's cgroup, disable
    what agentcg enabled, remove only the leaves it made. Returns the processes moved."""
    moved = 0
    for call in _children(tree, TOOLS):
        moved += move_all(tree, f"{TOOLS}/{call}", AGENT if tree.exists(AGENT) else "")
        _rmdir_all(tree._hierarchy_dirs(f"{TOOLS}/{call}"))
    if TOOLS in nesting.made:
        _rmdir_all(tree._hierarchy_dirs(TOOLS))
    if nesting.enabled:
        try:
            _fs.write(tree.root_dir / "cgroup.subtree_control", " ".join("-" + c for c in nesting.enabled))
        except CgroupGone:
            pass
    if tree.exists(AGENT):
        moved += move_all(tree, AGENT, "")
    if AGENT in nesting.made:
        _rmdir_all(tree._hierarchy_dirs(AGENT))
    return moved


def move_all(tree: V2Tree, source: str, target: str) -> int:
    """Move every process from `source` to `target`, hierarchy by hierarchy, in bounded
    rounds (processes forked meanwhile are caught by the next round)."""
    pairs = list(zip(tree._hierarchy_dirs(source), tree._hierarchy_dirs(target)))
    moved = 0
    for _ in range(MOVE_ROUNDS):
        moved_now = 0
        for src, dst in pairs:
            for pid in _pids(src):
                try:
                    _fs.write(dst / "cgroup.procs", str(pid))
                    moved_now += 1
                except CgroupGone:
                    continue   # exited meanwhile
        moved += moved_now
        if moved_now == 0:
            return moved
    left = sum(len(_pids(src)) for src, _ in pairs)
    if left:
        raise CgroupBusy(f"{tree.root_dir}: processes kept appearing in {source or 'the container cgroup'} "
                         f"after {MOVE_ROUNDS} rounds of moving them ({left} left)")
    return moved


def enable_controllers(tree: V2Tree) -> list[str]:
    """On pure v2: +memory +cpu +pids in the container's subtree_control where it has them."""
    if tree.kind != "v2":
        return []
    root = tree.root_dir
    available = set(_fs.read(root / "cgroup.controllers").split())
    current = set(_fs.read(root / "cgroup.subtree_control").split())
    wanted = [c for c in V2_CONTROLLERS if c in available and c not in current]
    if not wanted:
        return []
    for attempt in range(3):
        try:
            _fs.write(root / "cgroup.subtree_control", " ".join("+" + c for c in wanted))
            return wanted
        except CgroupBusy:
            if attempt == 2:
                raise
            move_all(tree, "", AGENT)   # a `docker exec` joined the container cgroup meanwhile
    return wanted


def _pids(directory: Path) -> list[int]:
    try:
        return [int(x) for x in _fs.read(directory / "cgroup.procs").split()]
    except CgroupGone:
        return []


def _children(tree: V2Tree, path: str) -> list[str]:
    try:
        return tree.children(path) if tree.exists(path) else []
    except CgroupGone:
        return []


def _mkdir_all(directories: list[Path]) -> bool:
    made = False
    for directory in directories:
        try:
            _fs.mkdir(directory)
            made = True
        except CgroupExists:
            pass
    return made


def _rmdir_all(directories: list[Path]) -> None:
    for directory in directories:
        try:
            _fs.rmdir(directory)
        except CgroupGone:
            pass
