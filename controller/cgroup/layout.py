"""Which cgroup hierarchies this host mounts, and where each controller lives.

Read once from /proc/self/mountinfo-style `/proc/mounts` and the v2 root's
`cgroup.controllers`; everything else (doctor, the cgroup layer) takes the result.
`proc_mounts` and the paths inside it can point at a fixture tree in tests.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from agentcg.errors import HostUnsupported

V1_CONTROLLERS = ("memory", "cpu", "cpuacct", "pids", "freezer", "cpuset", "blkio", "io", "devices", "hugetlb")


@dataclass(frozen=True)
class CgroupLayout:
    """The host's cgroup mounts.

    kind: "v2" (one unified hierarchy), "hybrid" (v1 controllers plus a v2 tree) or
    "v1" (no v2 tree at all; agentcg does not support it).
    """

    kind: str
    v2_mount: Path | None
    v2_controllers: frozenset[str]
    v1_mounts: dict[str, Path] = field(default_factory=dict)  # controller -> mount point
    v2_options: frozenset[str] = frozenset()

    @property
    def nsdelegate(self) -> bool:
        return "nsdelegate" in self.v2_options

    def hierarchy_of(self, controller: str) -> str | None:
        """'v2', 'v1' or None for where `controller` is usable."""
        if controller in self.v2_controllers:
            return "v2"
        if controller in self.v1_mounts:
            return "v1"
        return None


def detect_layout(proc_mounts: str | os.PathLike = "/proc/mounts") -> CgroupLayout:
    v2_mount: Path | None = None
    v2_options: frozenset[str] = frozenset()
    v1_mounts: dict[str, Path] = {}
    try:
        text = Path(proc_mounts).read_text()
    except OSError as exc:
        raise HostUnsupported(f"cannot read {proc_mounts}: {exc.strerror}; is /proc mounted?") from None
    for line in text.splitlines():
        parts = line.split()
        if len(parts) < 4:
            continue
        fstype, mount, options = parts[2], Path(parts[1].replace("\\040", " ")), parts[3].split(",")
        if fstype == "cgroup2" and v2_mount is None:
            v2_mount, v2_options = mount, frozenset(options)
        elif fstype == "cgroup":
            for option in options:
                if option in V1_CONTROLLERS:
                    v1_mounts.setdefault(option, mount)
    v2_controllers: frozenset[str] = frozenset()
    if v2_mount is not None:
        try:
            v2_controllers = frozenset((v2_mount / "cgroup.controllers").read_text().split())
        except OSError:
            v2_controllers = frozenset()
    if v2_mount is None:
        kind = "v1" if v1_mounts else "none"
    elif v1_mounts:
        kind = "hybrid"
    else:
        kind = "v2"
    return CgroupLayout(kind=kind, v2_mount=v2_mount, v2_controllers=v2_controllers,
                        v1_mounts=v1_mounts, v2_options=v2_options)
