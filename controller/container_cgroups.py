"""Cgroups agentcg did not create: a container's (Docker, Podman, Kubernetes, a systemd
unit), found from its init process, checked, and nested below.

    cg = cgroups_of_pid(pid, layout)            # ContainerCgroup: v2 path + v1 path per controller
    tree = container_tree(layout, cg)           # a CgroupTree rooted AT the container's cgroup
    tree.create("tools/tc-1")                   # <container>/tools/tc-1 in every hierarchy

Where runtimes put containers (read from /proc/<pid>/cgroup, never guessed):

| runtime, driver | path below each mount |
| --- | --- |
| Docker, systemd | system.slice/docker-<id>.scope |
| Docker, cgroupfs (and v1 hosts) | docker/<id> |
| Podman rootful, systemd | machine.slice/libpod-<id>.scope |
| Podman, cgroupfs | libpod_parent/libpod-<id> |
| Podman rootless | user.slice/user-<uid>.slice/user@<uid>.service/user.slice/libpod-<id>.scope |
| Kubernetes, systemd | kubepods.slice/kubepods-<qos>.slice/kubepods-<qos>-pod<uid>.slice/cri-containerd-<id>.scope (or crio-, docker-) |
| Kubernetes, cgroupfs | kubepods/<qos>/pod<uid>/<id> |

Container ids are 64 hex characters, so these names are longer than agentcg's own
segments (64): a container root is checked by `check_cgroup_path` instead (no '.', '..',
empty or over-long segment, no symlink, inside the mount, a real cgroup directory).
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agentcg.controller.cgroup import _fs
from agentcg.controller.cgroup.hybrid import JOINED_V1, HybridTree
from agentcg.controller.cgroup.layout import CgroupLayout
from agentcg.controller.cgroup.v2 import V2Tree
from agentcg.errors import AccessDenied, CgroupGone, HostUnsupported, InvalidInput, ProcessGone

NAME_MAX = 255                        # a cgroup directory name is a file name
MAX_PATH_CHARS = 4096
MAX_DEPTH = 16

_PATTERNS = (  # (runtime, driver, regex on the full path); first match wins
    ("kubernetes", "systemd", re.compile(r"(^|/)kubepods[^/]*\.slice/.*?(?:cri-containerd|crio|docker)-([0-9a-f]{12,64})\.scope$")),
    ("kubernetes", "systemd", re.compile(r"(^|/)kubepods[^/]*\.slice/(?:.*/)?kubepods-[^/]*pod([0-9a-f_-]{8,64})\.slice$")),
    ("kubernetes", "cgroupfs", re.compile(r"(^|/)kubepods/(?:[a-z]+/)?pod[0-9a-f-]{8,64}/([0-9a-f]{12,64})$")),
    ("kubernetes", "cgroupfs", re.compile(r"(^|/)kubepods/(?:[a-z]+/)?pod([0-9a-f-]{8,64})$")),
    ("docker", "systemd", re.compile(r"(^|/)docker-([0-9a-f]{12,64})\.scope$")),
    ("docker", "cgroupfs", re.compile(r"(^|/)docker/([0-9a-f]{12,64})$")),
    ("podman", "systemd", re.compile(r"(^|/)libpod-([0-9a-f]{12,64})\.scope$")),
    ("podman", "cgroupfs", re.compile(r"(^|/)libpod_parent/libpod-([0-9a-f]{12,64})$")),
)


@dataclass(frozen=True)
class CgroupKind:
    """What made a cgroup: runtime "docker" | "podman" | "kubernetes" | "unknown", driver
    "systemd" | "cgroupfs" | None, and the container id (or pod uid) in its name."""

    runtime: str
    driver: str | None
    ident: str | None


def classify(path: str) -> CgroupKind:
    """The runtime and driver a cgroup path (below the mount, no leading '/') comes from."""
    path = path.strip("/")
    for runtime, driver, pattern in _PATTERNS:
        match = pattern.search(path)
        if match:
            return CgroupKind(runtime, driver, match.group(2).replace("_", "-"))
    if path.endswith((".service", ".scope", ".slice")):
        return CgroupKind("systemd", "systemd", None)
    return CgroupKind("unknown", None, None)


@dataclass(frozen=True)
class ContainerCgroup:
    """A foreign cgroup: its path below the v2 mount and below each joined v1 controller's
    mount (hybrid hosts), all without a leading '/'."""

    v2: str
    v1: dict[str, str] = field(default_factory=dict)

    @property
    def kind(self) -> CgroupKind:
        return classify(self.v2)

    def to_dict(self) -> dict[str, Any]:
        return {"v2": self.v2, "v1": dict(self.v1)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ContainerCgroup":
        return cls(str(data["v2"]), {str(k): str(v) for k, v in dict(data.get("v1", {})).items()})


def cgroups_of_pid(pid: int, layout: CgroupLayout, proc: str | os.PathLike = "/proc") -> ContainerCgroup:
    """The cgroup `pid` is in, in the v2 tree and each v1 hierarchy agentcg joins."""
    from agentcg.procfs import ProcFs

    if isinstance(pid, bool) or not isinstance(pid, int) or pid <= 0:
        raise InvalidInput(f"pid must be a positive integer, got {pid!r}")
    try:
        lines = ProcFs(proc).cgroups(pid)
    except ProcessGone:
        raise CgroupGone(f"process {pid} does not exist (the container exited?)") from None
    v2, v1 = None, {}
    for line in lines:
        if line.hierarchy_id == 0 and not line.controllers:
            v2 = line.path
        for controller in line.controllers:
            if controller in JOINED_V1 and controller in layout.v1_mounts:
                v1[controller] = line.path.strip("/")
    if v2 is not None and v2.startswith("/.."):
        raise HostUnsupported(f"process {pid}'s cgroup {v2} lies outside this process's cgroup namespace: run the "
                              "daemon in the host's (e.g. nsenter --cgroup=/proc/1/ns/cgroup, see docs/containers.md)")
    if v2 is None:
        raise HostUnsupported(f"process {pid} has no cgroup v2 path in {proc}/{pid}/cgroup; agentcg needs a v2 tree")
    if v2.endswith(" (deleted)"):
        raise CgroupGone(f"process {pid}'s cgroup {v2} was removed (the container is exiting)")
    return ContainerCgroup(v2.strip("/"), v1 if layout.kind == "hybrid" else {})


def check_cgroup_path(mount: str | os.PathLike, path: str, *, own_root: str | None = None) -> Path:
    """The directory of a foreign cgroup `path` below `mount`, after checking it is one:
    relative segments only, no symlink anywhere, inside the mount, not the mount itself,
    not agentcg's own root (`own_root`), a directory with cgroup.procs. InvalidInput otherwise."""
    mount = Path(mount)
    if not isinstance(path, str) or not path.strip("/"):
        raise InvalidInput(f"cgroup path must name a cgroup below {mount}, such as "
                           f"'libpod_parent/libpod-<id>', got {path!r}")
    if len(path) > MAX_PATH_CHARS or "\0" in path or "\n" in path:
        raise InvalidInput(f"cgroup path {path[:80]!r}... is too long or has NUL/newline characters")
    text = path
    if text.startswith(str(mount) + "/"):
        text = text[len(str(mount)) + 1:]
    segments = text.strip("/").split("/")
    if len(segments) > MAX_DEPTH:
        raise InvalidInput(f"cgroup path {path!r} is deeper than {MAX_DEPTH} levels")
    for segment in segments:
        if segment in ("", ".", "..") or len(segment) > NAME_MAX:
            raise InvalidInput(f"bad cgroup path {path!r}: segment {segment!r} (no empty, '.', '..' or names over "
                               f"{NAME_MAX} characters); give the path below {mount}, e.g. as in /proc/<pid>/cgroup")
    relative = "/".join(segments)
    if own_root and (relative == own_root or relative.startswith(own_root + "/")):
        raise InvalidInput(f"cgroup {relative!r} is inside agentcg's own root {own_root!r}: that is a sandbox "
                           "already, not a container")
    directory = mount / relative
    current = mount
    for segment in segments:
        current = current / segment
        if current.is_symlink():
            raise InvalidInput(f"{current} is a symlink; give the real cgroup path (symlinks are not followed)")
    real = Path(os.path.realpath(directory))
    if real != directory or mount not in real.parents:
        raise InvalidInput(f"{directory} resolves outside the cgroup mount {mount}")
    if not (directory / "cgroup.procs").is_file():
        raise CgroupGone(f"{directory} is not a cgroup (no cgroup.procs): the container exited, or the path is wrong")
    return directory


def check_writable(directories: list[Path]) -> None:
    """AccessDenied unless agentcg may make children and move processes in each directory."""
    for directory in directories:
        if not os.access(directory, os.W_OK) or not os.access(directory / "cgroup.procs", os.W_OK):
            raise AccessDenied(f"{directory}: agentcg may not write here (read-only cgroupfs, or not root); run the "
                               "daemon as root on the host with the host's cgroup tree mounted read-write")


class ContainerV2Tree(V2Tree):
    """A V2Tree whose root is a foreign cgroup (checked by `check_cgroup_path`, not by
    agentcg's segment rule). Its root "" is the container's cgroup: never created, never
    removed by this class (see `remove`)."""

    def __init__(self, mount: str | os.PathLike, root: str, *, kernel_release: str | None = None) -> None:
        # V2Tree's own set-up with a placeholder root (its segment rule refuses container
        # names), then the real root: whatever V2Tree.__init__ learns to do, this does too.
        super().__init__(mount, _PLACEHOLDER, kernel_release=kernel_release)
        _reroot(self, root)

    def remove(self, path: str, timeout_s: float = 5.0) -> None:
        if path == "":
            raise InvalidInput(f"{self.root_dir} is the container's own cgroup: agentcg never removes it")
        super().remove(path, timeout_s)


class ContainerHybridTree(HybridTree):
    """The hybrid variant: the container's path may differ per v1 hierarchy."""

    def __init__(self, layout: CgroupLayout, cgroup: ContainerCgroup, *, kernel_release: str | None = None) -> None:
        super().__init__(layout, _PLACEHOLDER, kernel_release=kernel_release)
        self.v1_mounts = {c: m for c, m in self.v1_mounts.items() if c in cgroup.v1}
        self._v1_roots = dict(cgroup.v1)
        _reroot(self, cgroup.v2)

    def _v1_bases(self) -> list[Path]:
        bases: list[Path] = []
        for controller in JOINED_V1:
            mount = self.v1_mounts.get(controller)
            if mount is not None and mount / self._v1_roots[controller] not in bases:
                bases.append(mount / self._v1_roots[controller])
        return bases

    def cgroup_dir(self, path: str, hierarchy: str = "v2") -> Path:
        if hierarchy == "v2" or hierarchy not in self.v1_mounts:
            return super().cgroup_dir(path, hierarchy)
        from agentcg.controller.cgroup.base import validate_path
        path = validate_path(path)
        base = self.v1_mounts[hierarchy] / self._v1_roots[hierarchy]
        return base / path if path else base

    def remove(self, path: str, timeout_s: float = 5.0) -> None:
        if path == "":
            raise InvalidInput(f"{self.root_dir} is the container's own cgroup: agentcg never removes it")
        super().remove(path, timeout_s)


_PLACEHOLDER = "agentcg-container-placeholder"


def _reroot(tree: V2Tree, root: str) -> None:
    tree.root = root
    tree.root_dir = tree.mount / root
    tree._caps = tree._probe()


def container_tree(layout: CgroupLayout, cgroup: ContainerCgroup, *, own_root: str | None = None) -> V2Tree:
    """A CgroupTree rooted at the container's cgroup, after checking every directory of it."""
    if layout.v2_mount is None:
        raise HostUnsupported("no cgroup v2 tree is mounted; agentcg needs one (see `agentcg doctor`)")
    directories = [check_cgroup_path(layout.v2_mount, cgroup.v2, own_root=own_root)]
    if layout.kind == "hybrid":
        for controller, path in sorted(cgroup.v1.items()):
            directories.append(check_cgroup_path(layout.v1_mounts[controller], path, own_root=own_root))
        tree: V2Tree = ContainerHybridTree(layout, cgroup)
    elif layout.kind == "v2":
        tree = ContainerV2Tree(layout.v2_mount, cgroup.v2)
    else:
        raise HostUnsupported(f"cgroup layout {layout.kind!r} is not supported: agentcg needs a cgroup v2 tree")
    check_writable(directories)
    return tree


def procs_below_root(tree: V2Tree) -> dict[Path, list[int]]:
    """The processes directly in the container's root cgroup, per hierarchy directory."""
    out = {}
    for directory in tree._hierarchy_dirs(""):
        try:
            out[directory] = [int(x) for x in _fs.read(directory / "cgroup.procs").split()]
        except CgroupGone:
            out[directory] = []
    return out
