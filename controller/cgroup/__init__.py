"""agentcg.controller.cgroup: create, limit, observe and remove cgroups below a root.

    from agentcg.controller.cgroup import open_tree, UNLIMITED
    tree = open_tree(root="agentcg")       # V2Tree or HybridTree from the host's layout
    tree.create("sb1/tools/call-7")
    proc = tree.spawn("sb1/tools/call-7", ["/bin/true"])

The interface and the typed values are in `base`; the OS-facing code in `v2`, `v1`, `hybrid`.
"""
from __future__ import annotations

from agentcg.controller.cgroup.base import (
    UNLIMITED, CgroupTree, CpuStat, MemoryEvents, MemoryStat, Pressure, PressureLine,
    PressureTrigger, Unlimited, validate_path,
)
from agentcg.controller.cgroup.layout import CgroupLayout

__all__ = [
    "open_tree", "CgroupTree", "UNLIMITED", "Unlimited", "MemoryEvents", "MemoryStat", "CpuStat",
    "Pressure", "PressureLine", "PressureTrigger", "validate_path",
]

DEFAULT_ROOT = "agentcg"


def open_tree(root: str = DEFAULT_ROOT, layout: CgroupLayout | None = None) -> CgroupTree:
    """The tree for `root` on this host's layout (detect_layout() when None)."""
    from agentcg.controller.cgroup.layout import detect_layout
    from agentcg.errors import HostUnsupported

    layout = detect_layout() if layout is None else layout
    if layout.kind == "v2":
        from agentcg.controller.cgroup.v2 import V2Tree
        return V2Tree(layout.v2_mount, root)
    if layout.kind == "hybrid":
        from agentcg.controller.cgroup.hybrid import HybridTree
        return HybridTree(layout, root)
    raise HostUnsupported(
        f"cgroup layout {layout.kind!r} is not supported: agentcg needs a cgroup v2 tree "
        "(boot with systemd.unified_cgroup_hierarchy=1, or mount cgroup2 somewhere)"
    )
