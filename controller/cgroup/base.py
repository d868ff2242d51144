"""The cgroup interface every part codes against, and the typed values it returns.

Two implementations sit behind it: `V2Tree` (pure cgroup v2) and `HybridTree` (v1
controllers for memory/cpu/pids, the v2 tree for identity, freeze, kill and PSI).
`open_tree()` in this package picks one from the host's layout.

Paths are names relative to the tree's root, '/'-separated ("sb1/tools/call-7"); ""
is the root itself. Each segment: 1..64 chars of [A-Za-z0-9_.-], not "." or "..".

Units: bytes as int, seconds as float, counts as int. `UNLIMITED` stands for the
kernel's "max" (v2) or -1 / PAGE_COUNTER_MAX (v1).
"""
from __future__ import annotations

import abc
import re
import subprocess
from pathlib import Path
from typing import Any, NamedTuple, Sequence

from agentcg.controller.psi import Pressure, PressureLine, PressureTrigger
from agentcg.errors import InvalidInput

__all__ = [
    "UNLIMITED", "Unlimited", "MemoryEvents", "MemoryStat", "CpuStat", "Pressure", "PressureLine",
    "PressureTrigger", "CgroupTree", "validate_path", "SEGMENT_MAX_CHARS",
]

SEGMENT_MAX_CHARS = 64
_SEGMENT_RE = re.compile(r"^[A-Za-z0-9_.-]{1,%d}$" % SEGMENT_MAX_CHARS)


class Unlimited:
    """The type of `UNLIMITED`: no limit ("max" in v2)."""

    _instance: "Unlimited | None" = None

    def __new__(cls) -> "Unlimited":
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "UNLIMITED"

    def __reduce__(self) -> str:
        return "UNLIMITED"


UNLIMITED = Unlimited()


class MemoryEvents(NamedTuple):
    """Counts since the cgroup was created (v2 memory.events, hierarchical).
    On v1: max = memory.failcnt (times usage hit the limit), oom = oom_kill =
    memory.oom_control's oom_kill; low and high do not exist on v1 and read 0."""

    low: int
    high: int
    max: int
    oom: int
    oom_kill: int


class MemoryStat(NamedTuple):
    """memory.stat in bytes/counts; `fields` holds every key the kernel printed."""

    anon_bytes: int
    file_bytes: int
    kernel_bytes: int
    shmem_bytes: int
    pgfault: int
    pgmajfault: int
    fields: dict[str, int]


class CpuStat(NamedTuple):
    usage_s: float
    user_s: float
    system_s: float
    nr_periods: int
    nr_throttled: int
    throttled_s: float


def validate_path(path: str, *, allow_root: bool = True) -> str:
    """Check a cgroup path relative to the root; return it normalised (no edge slashes)."""
    if not isinstance(path, str):
        raise InvalidInput(f"cgroup path must be a string such as 'sb1/tools/call-7', got {path!r}")
    if path == "":
        if allow_root:
            return ""
        raise InvalidInput("cgroup path is empty; name a cgroup below the root, such as 'sb1'")
    segments = path.split("/")
    for segment in segments:
        if segment in (".", "..") or not _SEGMENT_RE.match(segment):
            raise InvalidInput(
                f"bad cgroup path {path!r}: segment {segment!r} must be 1..{SEGMENT_MAX_CHARS} characters "
                "of A-Z a-z 0-9 _ . - and not '.' or '..'; separate levels with single '/'"
            )
    return path


class CgroupTree(abc.ABC):
    """A subtree of the host's cgroups below `root`, on one layout (`kind`)."""

    kind: str   # "v2" | "hybrid"
    root: str   # root's path below each hierarchy's mount, e.g. "agentcg"

    # lifecycle
    @abc.abstractmethod
    def create(self, path: str, exist_ok: bool = False) -> None:
        """Create `path` (and missing parents) in every hierarchy; CgroupExists unless exist_ok."""

    @abc.abstractmethod
    def remove(self, path: str, timeout_s: float = 5.0) -> None:
        """Remove `path` and everything below it: kill processes, rmdir children first,
        retry while the kernel reports EBUSY; CgroupBusy when `timeout_s` runs out."""

    @abc.abstractmethod
    def exists(self, path: str) -> bool: ...

    @abc.abstractmethod
    def children(self, path: str = "") -> list[str]:
        """Names (not paths) of the direct children, sorted."""

    @abc.abstractmethod
    def pids(self, path: str) -> list[int]:
        """Processes directly in `path` (cgroup.procs), sorted."""

    @abc.abstractmethod
    def is_populated(self, path: str) -> bool:
        """True while any process is in `path` or below."""

    # processes
    @abc.abstractmethod
    def spawn(self, path: str, argv: Sequence[str], **popen_kwargs: Any) -> subprocess.Popen:
        """Start argv inside `path`: the child joins every hierarchy before exec."""

    @abc.abstractmethod
    def attach(self, path: str, pid: int) -> None: ...

    @abc.abstractmethod
    def cgroup_id(self, path: str) -> int:
        """The v2 directory's inode: what bpf_get_current_cgroup_id() returns."""

    # limits
    @abc.abstractmethod
    def set_memory(self, path: str, *, high: Any = None, max: Any = None, low: Any = None,
                   min: Any = None) -> None:
        """Bytes or UNLIMITED each; None leaves a value as it is."""

    @abc.abstractmethod
    def set_cpu(self, path: str, *, weight: int | None = None, max_s: Any = None,
                period_s: float = 0.1) -> None:
        """weight 1..10000 (default 100); max_s CPU-seconds per period_s, or UNLIMITED."""

    @abc.abstractmethod
    def set_pids_max(self, path: str, value: Any) -> None: ...

    # state
    @abc.abstractmethod
    def freeze(self, path: str) -> None: ...

    @abc.abstractmethod
    def thaw(self, path: str) -> None: ...

    @abc.abstractmethod
    def is_frozen(self, path: str) -> bool: ...

    @abc.abstractmethod
    def kill(self, path: str) -> None:
        """SIGKILL every process in `path` and below (returns before they are reaped)."""

    # readings
    @abc.abstractmethod
    def memory_current(self, path: str) -> int: ...

    @abc.abstractmethod
    def memory_peak(self, path: str) -> int: ...

    @abc.abstractmethod
    def memory_events(self, path: str) -> MemoryEvents: ...

    @abc.abstractmethod
    def memory_stat(self, path: str) -> MemoryStat: ...

    @abc.abstractmethod
    def cpu_stat(self, path: str) -> CpuStat: ...

    @abc.abstractmethod
    def pressure(self, path: str, resource: str = "memory") -> Pressure: ...

    @abc.abstractmethod
    def pressure_trigger(self, path: str, resource: str = "memory", kind: str = "some",
                         stall_s: float = 0.15, window_s: float = 1.0) -> PressureTrigger: ...

    @abc.abstractmethod
    def cgroup_dir(self, path: str, hierarchy: str = "v2") -> Path:
        """The directory of `path` in a hierarchy: "v2", or a v1 controller name on hybrid."""

    @property
    @abc.abstractmethod
    def capabilities(self) -> frozenset[str]:
        """What this tree can do on this host, probed once at open: a subset of
        {"memory.max", "memory.high", "memory.low", "memory.min", "memory.peak",
        "cpu.weight", "cpu.max", "pids.max", "freeze", "kill", "psi"}. Operations
        outside it raise ControllerMissing."""
