"""Reading and writing cgroup files: the one place where OSError becomes an agentcg error.

ENOENT on a file whose directory still exists means the controller behind the file is
not enabled there (ControllerMissing); ENOENT on the directory means the cgroup is gone.
"""
from __future__ import annotations

import errno
import os
from pathlib import Path

from agentcg.errors import (
    AccessDenied, CgroupBusy, CgroupError, CgroupExists, CgroupGone, ControllerMissing, InvalidInput,
)

# file prefix -> controller that provides it, for the ControllerMissing message
_CONTROLLER_OF = {
    "memory.": "memory", "cpu.": "cpu", "cpuacct.": "cpuacct", "pids.": "pids",
    "freezer.": "freezer", "io.": "io", "cgroup.": "cgroup core",
}


_DIR_ACTIONS = ("mkdir", "rmdir", "stat", "list")


def translate(exc: OSError, path: Path, action: str, value: str | None = None) -> Exception:
    code = exc.errno
    if code == errno.ENOENT:
        if action in _DIR_ACTIONS:
            gone = path.parent if action == "mkdir" else path
            return CgroupGone(f"{gone}: the cgroup does not exist (removed, or never created)")
        if path.parent.is_dir():
            controller = next((c for p, c in _CONTROLLER_OF.items() if path.name.startswith(p)), "?")
            return ControllerMissing(
                f"{path} does not exist: the {controller} controller is not available in this cgroup "
                "(enable it in the parent's cgroup.subtree_control, or check `agentcg doctor`)"
            )
        return CgroupGone(f"{path.parent}: the cgroup does not exist (removed, or never created)")
    if code == errno.EEXIST:
        return CgroupExists(f"{path}: the cgroup already exists (pass exist_ok=True to reuse it)")
    if code in (errno.EPERM, errno.EACCES):
        return AccessDenied(f"{action} {path}: {exc.strerror}; run as root or inside a delegated cgroup")
    if code == errno.EBUSY:
        return CgroupBusy(f"{action} {path}: busy (processes or child cgroups remain)")
    if code == errno.ESRCH:
        return CgroupGone(f"{action} {path}: process {value} does not exist")
    if code in (errno.EINVAL, errno.ERANGE) and value is not None:
        return InvalidInput(f"{path}: the kernel refused the value {value!r} ({exc.strerror})")
    if code == errno.EOPNOTSUPP:
        return ControllerMissing(f"{action} {path}: not supported here ({exc.strerror})")
    return CgroupError(f"{action} {path}: {exc.strerror or exc}")


def read(path: Path) -> str:
    try:
        with open(path, "rb", buffering=0) as f:
            return f.read().decode()
    except OSError as exc:
        raise translate(exc, path, "read") from None


def write(path: Path, value: str) -> None:
    """One write(2) per value: cgroup files act on each write call."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_TRUNC | os.O_CLOEXEC)  # O_TRUNC: harmless on cgroupfs, needed on fixture trees
    except OSError as exc:
        raise translate(exc, path, "open") from None
    try:
        os.write(fd, value.encode())
    except OSError as exc:
        raise translate(exc, path, "write", value) from None
    finally:
        os.close(fd)


def read_int(path: Path) -> int:
    text = read(path).strip()
    try:
        return int(text)
    except ValueError:
        raise CgroupError(f"{path}: expected an integer, read {text!r}") from None


def read_keyed(path: Path) -> dict[str, int]:
    """'key value' lines (memory.stat, memory.events, cpu.stat) -> {key: int}."""
    out: dict[str, int] = {}
    for line in read(path).splitlines():
        parts = line.split()
        if len(parts) != 2:
            continue
        try:
            out[parts[0]] = int(parts[1])
        except ValueError:
            raise CgroupError(f"{path}: malformed line {line!r}") from None
    return out


def open_procs(path: Path) -> int:
    """An O_WRONLY fd on cgroup.procs, opened before a fork so the child only writes."""
    try:
        return os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise translate(exc, path, "open") from None


def mkdir(path: Path) -> None:
    try:
        os.mkdir(path)
    except OSError as exc:
        raise translate(exc, path, "mkdir") from None


def rmdir(path: Path) -> None:
    try:
        os.rmdir(path)
    except OSError as exc:
        raise translate(exc, path, "rmdir") from None


def inode(path: Path) -> int:
    try:
        return os.stat(path).st_ino
    except OSError as exc:
        raise translate(exc, path, "stat") from None
