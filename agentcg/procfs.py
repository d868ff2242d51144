"""The one module that reads /proc: typed values from a root that tests can point at.

    procfs = ProcFs()                    # or ProcFs(tmp_path / "proc") over a fixture tree
    procfs.stat(pid)      -> ProcStat(pid, comm, state, ppid, start_ticks)
    procfs.cgroups(pid)   -> [ProcCgroup(hierarchy_id, controllers, path), ...]
    procfs.status(pid)    -> ProcStatus(uids, gids, groups, cap_effective)
    procfs.cmdline(pid)   -> ["argv0", "argv1", ...]
    procfs.is_alive(pid, start_ticks)    # False for a zombie and for a recycled pid

`pid` is a positive int or "self". A process that is not there (never was, exited, or
is a zombie whose files are gone) raises `ProcessGone`; EPERM/EACCES raise
`AccessDenied`; a file that does not parse raises `InvalidInput` naming it, which only a
broken fixture tree can produce. Nothing is read at import time.

Field numbers follow proc(5): in /proc/<pid>/stat, field 2 is `(comm)` (which may itself
contain spaces and parentheses, so the line is split at the LAST ")"), field 3 the state,
4 the ppid and 22 the start time in clock ticks since boot.
"""
from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import NamedTuple, Union

from agentcg.errors import AccessDenied, InvalidInput, ProcessGone

Pid = Union[int, str]

MAX_CMDLINE_BYTES = 128 * 1024     # ARG_MAX-sized; a longer command line is cut
MAX_SMALL_FILE_BYTES = 64 * 1024   # stat, status, cgroup: a few hundred bytes in practice
ZOMBIE_STATES = frozenset("ZX")    # zombie, dead (proc(5)); neither will run again


class ProcStat(NamedTuple):
    pid: int
    comm: str
    state: str          # one letter: R, S, D, Z, T, t, X, I, ...
    ppid: int
    start_ticks: int    # since boot, in clock ticks (os.sysconf("SC_CLK_TCK") per second)


class ProcCgroup(NamedTuple):
    hierarchy_id: int               # 0 for the cgroup v2 line
    controllers: tuple[str, ...]    # () for v2; ("cpu", "cpuacct") or ("name=systemd",) on v1
    path: str                       # relative to the hierarchy's mount, starting with "/"


class ProcStatus(NamedTuple):
    uids: tuple[int, int, int, int]     # real, effective, saved, filesystem
    gids: tuple[int, int, int, int]
    groups: frozenset[int]              # supplementary groups
    cap_effective: int                  # CapEff bit mask


class ProcFs:
    """Reads /proc below `root` (default the real /proc)."""

    def __init__(self, root: str | os.PathLike = "/proc") -> None:
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"ProcFs({str(self.root)!r})"

    # ---- files of one process ----------------------------------------------------
    def stat(self, pid: Pid) -> ProcStat:
        path, text = self._read(pid, "stat")
        head, sep, tail = text.rpartition(")")
        fields = tail.split()
        try:
            if not sep or "(" not in head:
                raise ValueError("no (comm)")
            pid_text, comm = head.split("(", 1)
            return ProcStat(int(pid_text), comm, fields[0], int(fields[1]), int(fields[19]))
        except (ValueError, IndexError):
            raise InvalidInput(f"{path}: not a /proc stat line ({text[:80]!r})") from None

    def cgroups(self, pid: Pid) -> list[ProcCgroup]:
        path, text = self._read(pid, "cgroup")
        out = []
        for line in text.splitlines():
            parts = line.split(":", 2)
            if len(parts) != 3 or not parts[0].isdigit():
                raise InvalidInput(f"{path}: not a /proc cgroup line ({line[:80]!r})")
            hierarchy, controllers, cgroup_path = parts
            out.append(ProcCgroup(int(hierarchy), tuple(c for c in controllers.split(",") if c), cgroup_path))
        return out

    def v2_cgroup(self, pid: Pid) -> str | None:
        """The path on the unified (v2) hierarchy, or None on a v1-only host."""
        return next((c.path for c in self.cgroups(pid) if c.hierarchy_id == 0 and not c.controllers), None)

    def v1_cgroup(self, pid: Pid, controller: str) -> str | None:
        """The path on the v1 hierarchy that carries `controller` (e.g. "memory"), or None."""
        return next((c.path for c in self.cgroups(pid) if controller in c.controllers), None)

    def status(self, pid: Pid) -> ProcStatus:
        path, text = self._read(pid, "status")
        fields = {}
        for line in text.splitlines():
            key, _, value = line.partition(":")
            fields[key] = value.split()
        try:
            uids = tuple(int(v) for v in fields["Uid"])
            gids = tuple(int(v) for v in fields["Gid"])
            groups = frozenset(int(v) for v in fields.get("Groups", []))
            cap = int(fields["CapEff"][0], 16) if fields.get("CapEff") else 0
            if len(uids) != 4 or len(gids) != 4:
                raise ValueError("Uid/Gid need four values")
        except (KeyError, ValueError, IndexError) as exc:
            raise InvalidInput(f"{path}: not a /proc status file ({exc})") from None
        return ProcStatus(uids, gids, groups, cap)  # type: ignore[arg-type]

    def cmdline(self, pid: Pid) -> list[str]:
        """argv as the process set it; [] for a kernel thread or a zombie."""
        _, raw = self._read(pid, "cmdline", binary=True, limit=MAX_CMDLINE_BYTES)
        return [a.decode("utf-8", "replace") for a in raw.rstrip(b"\0").split(b"\0")] if raw.strip(b"\0") else []

    def tids(self, pid: Pid) -> list[int]:
        """The ids of the process's threads (its own pid among them)."""
        path = self._path(pid, "task")
        try:
            return sorted(int(t) for t in os.listdir(path) if t.isdigit())
        except OSError as exc:
            raise self._error(path, pid, exc) from None

    def maps(self, pid: Pid) -> str:
        """/proc/<pid>/maps as text (what is mapped where; needs ptrace access)."""
        return self._read(pid, "maps", limit=None)[1]

    def fdinfo(self, fd: int, pid: Pid = "self") -> dict[str, str]:
        """/proc/<pid>/fdinfo/<fd> as key -> value text."""
        _, text = self._read(pid, f"fdinfo/{int(fd)}")
        return {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in text.splitlines()) if k}

    def write_oom_score_adj(self, value: int, pid: Pid = "self") -> None:
        """Sets /proc/<pid>/oom_score_adj (-1000..1000; lowering it needs CAP_SYS_RESOURCE)."""
        if isinstance(value, bool) or not isinstance(value, int) or not -1000 <= value <= 1000:
            raise InvalidInput(f"oom_score_adj must be an integer in -1000..1000, got {value!r}")
        path = self._path(pid, "oom_score_adj")
        try:
            fd = os.open(path, os.O_WRONLY)
            try:
                os.write(fd, str(value).encode())
            finally:
                os.close(fd)
        except OSError as exc:
            raise self._error(path, pid, exc) from None

    # ---- liveness ----------------------------------------------------------------
    def start_ticks(self, pid: Pid) -> int | None:
        """The process's start time in ticks since boot, or None when it is gone."""
        try:
            return self.stat(pid).start_ticks
        except ProcessGone:
            return None

    def is_alive(self, pid: Pid, start_ticks: int | None = None) -> bool:
        """True when `pid` exists, is not a zombie and (when given) started at `start_ticks`,
        so a pid the kernel recycled for another process does not count."""
        try:
            stat = self.stat(pid)
        except ProcessGone:
            return False
        if stat.state in ZOMBIE_STATES:
            return False
        return start_ticks is None or stat.start_ticks == start_ticks

    # ---- host-wide files ---------------------------------------------------------
    def meminfo(self) -> dict[str, int]:
        """/proc/meminfo in bytes (the kB lines converted), e.g. {"MemTotal": ...}."""
        text = self._read_path(self.root / "meminfo", None)
        out = {}
        for line in text.splitlines():
            key, _, value = line.partition(":")
            parts = value.split()
            if parts and parts[0].isdigit():
                out[key] = int(parts[0]) * (1024 if parts[1:] == ["kB"] else 1)
        return out

    def text(self, relative: str) -> str:
        """A host-wide file below the root as text (e.g. "mounts", "cpuinfo", "sys/kernel/osrelease")."""
        if relative.startswith("/") or ".." in Path(relative).parts:
            raise InvalidInput(f"{relative!r}: give a path relative to {self.root}")
        return self._read_path(self.root / relative, None)

    # ---- one boundary for OS errors ----------------------------------------------
    def _path(self, pid: Pid, name: str) -> Path:
        if pid != "self" and (isinstance(pid, bool) or not isinstance(pid, int) or pid <= 0):
            raise InvalidInput(f"pid must be a positive integer or 'self', got {pid!r}")
        return self.root / str(pid) / name

    def _read(self, pid: Pid, name: str, *, binary: bool = False, limit: int | None = MAX_SMALL_FILE_BYTES):
        path = self._path(pid, name)
        try:
            with open(path, "rb") as f:
                raw = f.read() if limit is None else f.read(limit)
        except OSError as exc:
            raise self._error(path, pid, exc) from None
        return path, raw if binary else raw.decode("utf-8", "replace")

    def _read_path(self, path: Path, limit: int | None) -> str:
        try:
            with open(path, "rb") as f:
                return (f.read() if limit is None else f.read(limit)).decode("utf-8", "replace")
        except OSError as exc:
            if exc.errno in (errno.EPERM, errno.EACCES):
                raise AccessDenied(f"cannot read {path}: {exc.strerror}; run as root") from None
            raise InvalidInput(f"cannot read {path}: {exc.strerror}; is /proc mounted at {self.root}?") from None

    @staticmethod
    def _error(path: Path, pid: Pid, exc: OSError) -> Exception:
        if exc.errno in (errno.EPERM, errno.EACCES):
            return AccessDenied(f"cannot read {path}: {exc.strerror}; it is another user's process (run as root)")
        # ENOENT: never was or exited; ESRCH: exited while we read (a zombie's task files)
        return ProcessGone(f"process {pid} does not exist (it may have exited already)", pid)


PROC = ProcFs()   # the host's /proc; stateless, so one shared instance is safe
