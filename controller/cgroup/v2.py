"""The pure cgroup v2 tree (Documentation/admin-guide/cgroup-v2.rst).

Everything lives in one hierarchy at `mount`; the tree's root is `mount/<root>`. On a
hybrid host `HybridTree` reuses this class for what the v2 tree has there (identity,
freeze, kill, PSI) and overrides the resource controllers with v1.
"""
from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from agentcg.controller.cgroup import _fs
from agentcg.controller.cgroup.spawner import spawn_joined
from agentcg.controller.cgroup.base import (
    UNLIMITED, CgroupTree, CpuStat, MemoryEvents, MemoryStat, Unlimited, validate_path,
)
from agentcg.controller.psi import RESOURCES, Pressure, PressureTrigger, parse_pressure
from agentcg.errors import (
    CgroupBusy, CgroupError, CgroupExists, CgroupGone, ControllerMissing, InvalidInput,
)

RESOURCE_CONTROLLERS = ("memory", "cpu", "pids")
CPU_WEIGHT_RANGE = (1, 10000)
CPU_PERIOD_RANGE_S = (0.001, 1.0)     # kernel: 1 ms .. 1 s
CPU_QUOTA_MIN_S = 0.001               # kernel: quota >= 1 ms
FREEZE_TIMEOUT_S = 2.0
KILL_ROUNDS = 50                      # SIGKILL sweeps when cgroup.kill is absent (< 5.14)
_REMOVE_BACKOFF_S = (0.0005, 0.05)    # first and largest sleep between removal retries
_PATH_CACHE_MAX = 4096                # memoised path -> directory entries per tree (then cleared)


def kernel_at_least(release: str, major: int, minor: int) -> bool:
    try:
        parts = release.split("-")[0].split(".")
        return (int(parts[0]), int(parts[1])) >= (major, minor)
    except (IndexError, ValueError):
        return False


def limit_text(value: Any, what: str, unlimited_text: str = "max") -> str:
    """Bytes/count or UNLIMITED -> the text the kernel takes."""
    if isinstance(value, Unlimited):
        return unlimited_text
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidInput(f"{what}: expected an int (bytes or count) or UNLIMITED, got {value!r}")
    if value < 0:
        raise InvalidInput(f"{what}: cannot be negative, got {value}")
    return str(value)


def check_weight(weight: Any) -> int:
    low, high = CPU_WEIGHT_RANGE
    if isinstance(weight, bool) or not isinstance(weight, int) or not low <= weight <= high:
        raise InvalidInput(f"cpu weight must be an int in {low}..{high} (100 is the default), got {weight!r}")
    return weight


def check_cpu_max(max_s: Any, period_s: Any) -> tuple[int | None, int]:
    """-> (quota_us or None for unlimited, period_us)."""
    low, high = CPU_PERIOD_RANGE_S
    if isinstance(period_s, bool) or not isinstance(period_s, (int, float)) or not low <= period_s <= high:
        raise InvalidInput(f"cpu period must be {low}..{high} s, got {period_s!r}")
    period_us = int(round(period_s * 1e6))
    if isinstance(max_s, Unlimited):
        return None, period_us
    if isinstance(max_s, bool) or not isinstance(max_s, (int, float)) or not max_s >= CPU_QUOTA_MIN_S:
        raise InvalidInput(
            f"cpu max must be CPU-seconds per period (>= {CPU_QUOTA_MIN_S}; 0.05 with period 0.1 = half a CPU) "
            f"or UNLIMITED, got {max_s!r}"
        )
    return int(round(max_s * 1e6)), period_us


class V2Tree(CgroupTree):
    kind = "v2"

    def __init__(self, mount: str | os.PathLike, root: str = "agentcg", *,
                 kernel_release: str | None = None) -> None:
        self.mount = Path(mount)
        if not self.mount.is_dir():
            raise ControllerMissing(f"cgroup v2 mount {self.mount} does not exist; check `agentcg doctor`")
        self.root = validate_path(root, allow_root=False)
        self.root_dir = self.mount / self.root
        self._release = kernel_release or os.uname().release
        self._caps = self._probe()

    # ---- paths and probing ------------------------------------------------------
    def _dir(self, path: str) -> Path:
        # memoised: a tool call's path is resolved a few dozen times between begin and end,
        # and pathlib plus validation were ~10 % of the daemon's CPU per call
        try:
            return self._dirs[path]
        except (KeyError, TypeError):
            pass
        except AttributeError:
            self._dirs = {}
        checked = validate_path(path)
        directory = self.root_dir / checked if checked else self.root_dir
        if len(self._dirs) >= _PATH_CACHE_MAX:
            self._dirs.clear()
        self._dirs[path] = directory
        return directory

    def _forget_path(self, path: str) -> None:
        """Drop a removed cgroup from the memoised directories (a path's directory never
        changes, so this only bounds memory; what a removed subtree leaves ages out at the cap)."""
        for name in ("_dirs", "_v1_dirs"):
            cache = self.__dict__.get(name)
            if not cache:
                continue
            if not path:
                cache.clear()
                continue
            cache.pop(path, None)
            for hierarchy in getattr(self, "v1_mounts", {}):
                cache.pop((path, hierarchy), None)

    def _hierarchy_dirs(self, path: str) -> list[Path]:
        """The cgroup's directory in every hierarchy it lives in (v2 first)."""
        return [self._dir(path)]

    def _probe(self) -> frozenset[str]:
        # What our root can have: the controllers its parent hands down.
        parent = self.root_dir.parent
        try:
            granted = set(_fs.read(parent / "cgroup.subtree_control").split())
        except (CgroupError, ControllerMissing):
            granted = set()
        caps: set[str] = set()
        if "memory" in granted:
            caps |= {"memory.max", "memory.high", "memory.low", "memory.min"}
            if kernel_at_least(self._release, 5, 19):
                caps.add("memory.peak")
        if "cpu" in granted:
            caps |= {"cpu.weight", "cpu.max"}
        if "pids" in granted:
            caps.add("pids.max")
        caps |= self._core_caps()
        return frozenset(caps)

    def _core_caps(self) -> set[str]:
        caps = set()
        if kernel_at_least(self._release, 5, 2):
            caps.add("freeze")
        if kernel_at_least(self._release, 5, 14):
            caps.add("kill")
        if (self.mount / "cgroup.pressure").exists() or (self.mount / "memory.pressure").exists():
            caps.add("psi")
        return caps

    @property
    def capabilities(self) -> frozenset[str]:
        return self._caps

    def _require(self, cap: str) -> None:
        if cap not in self._caps:
            raise ControllerMissing(
                f"{cap} is not available for cgroups below {self.root_dir} on this host "
                f"(have: {', '.join(sorted(self._caps)) or 'nothing'}); see `agentcg doctor`"
            )

    def cgroup_dir(self, path: str, hierarchy: str = "v2") -> Path:
        if hierarchy != "v2":
            raise InvalidInput(f"hierarchy {hierarchy!r}: a pure v2 host has only 'v2'")
        return self._dir(path)

    # ---- lifecycle --------------------------------------------------------------
    def create(self, path: str, exist_ok: bool = False) -> None:
        path = validate_path(path, allow_root=False)
        for base in self._hierarchy_bases():
            self._create_in(base, path, exist_ok, enable=(base == self.root_dir))

    def _hierarchy_bases(self) -> list[Path]:
        return [self.root_dir]

    def _create_in(self, base: Path, path: str, exist_ok: bool, enable: bool) -> None:
        target = base / path
        if not enable or target.parent.is_dir():
            # fast path: the parents exist (their own parents were enabled when they were made)
            try:
                if enable:
                    self._enable_controllers(target.parent)
                _fs.mkdir(target)
                return
            except CgroupExists:
                if not exist_ok:
                    raise
                return
            except CgroupGone:
                pass  # a parent is missing: create the chain below
        if not base.is_dir():
            try:
                _fs.mkdir(base)
            except CgroupExists:
                pass
        current = base
        segments = path.split("/")
        for i, segment in enumerate(segments):
            if enable:
                self._enable_controllers(current)
            current = current / segment
            last = i == len(segments) - 1
            try:
                _fs.mkdir(current)
            except CgroupExists:
                if last and not exist_ok:
                    raise

    def _enable_controllers(self, parent: Path) -> None:
        wanted = [c for c in RESOURCE_CONTROLLERS if self._cap_for(c)]
        if not wanted:
            return
        enabled = set(_fs.read(parent / "cgroup.subtree_control").split())
        missing = [c for c in wanted if c not in enabled]
        if missing:
            try:
                _fs.write(parent / "cgroup.subtree_control", " ".join("+" + c for c in missing))
            except CgroupBusy:
                raise CgroupBusy(
                    f"cannot enable {', '.join(missing)} in {parent}: it holds processes, and cgroup v2 "
                    "allows controllers only below cgroups without processes; move them to a leaf"
                ) from None

    def _cap_for(self, controller: str) -> bool:
        return {"memory": "memory.max", "cpu": "cpu.weight", "pids": "pids.max"}[controller] in self._caps

    def exists(self, path: str) -> bool:
        return self._dir(path).is_dir()

    def children(self, path: str = "") -> list[str]:
        directory = self._dir(path)
        try:
            return sorted(entry.name for entry in os.scandir(directory) if entry.is_dir(follow_symlinks=False))
        except OSError as exc:
            raise _fs.translate(exc, directory, "list") from None

    def pids(self, path: str) -> list[int]:
        return sorted(int(x) for x in _fs.read(self._dir(path) / "cgroup.procs").split())

    def is_populated(self, path: str) -> bool:
        return _fs.read_keyed(self._dir(path) / "cgroup.events").get("populated", 0) == 1

    def remove(self, path: str, timeout_s: float = 5.0) -> None:
        """Kill what runs inside, then rmdir deepest first in every hierarchy, retrying
        EBUSY (exiting tasks leave the cgroup asynchronously) until `timeout_s`."""
        path = validate_path(path)
        if not self.exists(path):
            raise CgroupGone(f"{self._dir(path)}: the cgroup does not exist (removed, or never created)")
        deadline = time.monotonic() + timeout_s
        sleep_s = _REMOVE_BACKOFF_S[0]
        killed_at_least_once = False
        directories = self._hierarchy_dirs(path)
        while True:
            # rmdir first: an empty leaf (the common case) goes without reading anything
            busy = [d for d in directories if not _rmdir_tree(d)]
            if not busy:
                self._forget_path(path)
                return
            if self._any_process(path):
                self._kill_quiet(path)
                killed_at_least_once = True
            if time.monotonic() >= deadline:
                raise CgroupBusy(
                    f"could not remove {', '.join(map(str, busy))} within {timeout_s} s"
                    f"{' after killing its processes' if killed_at_least_once else ''}: processes "
                    "remain (uninterruptible sleep?) or another agent keeps creating children"
                )
            time.sleep(sleep_s)
            sleep_s = min(sleep_s * 2, _REMOVE_BACKOFF_S[1])

    def _any_process(self, path: str) -> bool:
        try:
            return self.is_populated(path)
        except CgroupGone:
            return False

    def _kill_quiet(self, path: str) -> None:
        try:
            self.kill(path)
        except CgroupGone:
            pass

    # ---- processes --------------------------------------------------------------
    def spawn(self, path: str, argv: Sequence[str], **popen_kwargs: Any) -> subprocess.Popen:
        """argv's first instruction runs inside the cgroup in every hierarchy. The caller is
        not forked: it vforks the exec helper of `spawner`, which joins, then execs. With a
        `preexec_fn` (or `executable`) of the caller's own, the child is forked instead and
        joins through fds the parent opened before fork (about 3 ms more from a big
        process; see bench/bench_spawn.py)."""
        if isinstance(argv, (str, bytes)) or not argv:
            raise InvalidInput(f"spawn: argv must be a non-empty list such as ['/bin/true'], got {argv!r}")
        directories = self._hierarchy_dirs(validate_path(path))
        if popen_kwargs.get("preexec_fn") is None and popen_kwargs.get("executable") is None:
            popen_kwargs.pop("preexec_fn", None)
            popen_kwargs.pop("executable", None)
            try:
                return spawn_joined([d / "cgroup.procs" for d in directories], argv, **popen_kwargs)
            except CgroupGone:
                raise CgroupGone(f"{self._dir(path)}: the cgroup vanished while spawning {argv[0]!r}") from None
        fds: list[int] = []
        try:
            for directory in directories:
                fds.append(_fs.open_procs(directory / "cgroup.procs"))
            user_preexec: Callable[[], Any] | None = popen_kwargs.pop("preexec_fn", None)
            join = _joiner(fds, user_preexec)
            try:
                return subprocess.Popen(list(argv), preexec_fn=join, **popen_kwargs)
            except subprocess.SubprocessError as exc:
                if not self.exists(path):
                    raise CgroupGone(f"{self._dir(path)}: the cgroup vanished while spawning {argv[0]!r}") from None
                raise CgroupError(f"spawning {argv[0]!r} into {self._dir(path)} failed: {exc}") from None
        finally:
            for fd in fds:
                os.close(fd)

    def attach(self, path: str, pid: int) -> None:
        if isinstance(pid, bool) or not isinstance(pid, int) or pid <= 0:
            raise InvalidInput(f"attach: pid must be a positive int, got {pid!r}")
        for directory in self._hierarchy_dirs(validate_path(path)):
            _fs.write(directory / "cgroup.procs", str(pid))

    def cgroup_id(self, path: str) -> int:
        return _fs.inode(self._dir(path))

    # ---- limits -----------------------------------------------------------------
    def set_memory(self, path: str, *, high: Any = None, max: Any = None, low: Any = None,
                   min: Any = None) -> None:
        directory = self._dir(validate_path(path))
        values = {"memory.min": min, "memory.low": low, "memory.high": high, "memory.max": max}
        texts = {name: limit_text(value, name) for name, value in values.items() if value is not None}
        for name, text in texts.items():
            self._require(name)
            _fs.write(directory / name, text)

    def set_cpu(self, path: str, *, weight: int | None = None, max_s: Any = None,
                period_s: float = 0.1) -> None:
        directory = self._dir(validate_path(path))
        if weight is not None:
            self._require("cpu.weight")
            _fs.write(directory / "cpu.weight", str(check_weight(weight)))
        if max_s is not None:
            quota_us, period_us = check_cpu_max(max_s, period_s)
            self._require("cpu.max")
            _fs.write(directory / "cpu.max", f"{'max' if quota_us is None else quota_us} {period_us}")

    def set_pids_max(self, path: str, value: Any) -> None:
        text = limit_text(value, "pids.max")
        self._require("pids.max")
        _fs.write(self._dir(validate_path(path)) / "pids.max", text)

    # ---- state ------------------------------------------------------------------
    def freeze(self, path: str) -> None:
        """Freeze and wait (bounded) until the kernel reports every task frozen."""
        self._set_frozen(path, True)

    def thaw(self, path: str) -> None:
        self._set_frozen(path, False)

    def _set_frozen(self, path: str, frozen: bool) -> None:
        self._require("freeze")
        directory = self._dir(validate_path(path))
        _fs.write(directory / "cgroup.freeze", "1" if frozen else "0")
        deadline = time.monotonic() + FREEZE_TIMEOUT_S
        while self.is_frozen(path) != frozen:
            if time.monotonic() >= deadline:
                raise CgroupBusy(f"{directory}: not {'frozen' if frozen else 'thawed'} after {FREEZE_TIMEOUT_S} s")
            time.sleep(0.001)

    def is_frozen(self, path: str) -> bool:
        return _fs.read_keyed(self._dir(path) / "cgroup.events").get("frozen", 0) == 1

    def kill(self, path: str) -> None:
        directory = self._dir(validate_path(path))
        if "kill" in self._caps:
            _fs.write(directory / "cgroup.kill", "1")
        else:  # before 5.14: sweep, since a task may fork between reading procs and killing
            sweep_kill([directory])

    # ---- readings ---------------------------------------------------------------
    def memory_current(self, path: str) -> int:
        return _fs.read_int(self._dir(path) / "memory.current")

    def memory_peak(self, path: str) -> int:
        return _fs.read_int(self._dir(path) / "memory.peak")

    def memory_events(self, path: str) -> MemoryEvents:
        events = _fs.read_keyed(self._dir(path) / "memory.events")
        return MemoryEvents(*(events.get(k, 0) for k in ("low", "high", "max", "oom", "oom_kill")))

    def memory_stat(self, path: str) -> MemoryStat:
        stat = _fs.read_keyed(self._dir(path) / "memory.stat")
        if "kernel" in stat:
            kernel = stat["kernel"]
        else:  # before 5.18 there is no "kernel" line: sum its parts
            kernel = sum(stat.get(k, 0) for k in ("kernel_stack", "pagetables", "percpu", "sock", "slab"))
        return MemoryStat(
            anon_bytes=stat.get("anon", 0), file_bytes=stat.get("file", 0), kernel_bytes=kernel,
            shmem_bytes=stat.get("shmem", 0), pgfault=stat.get("pgfault", 0),
            pgmajfault=stat.get("pgmajfault", 0), fields=stat,
        )

    def cpu_stat(self, path: str) -> CpuStat:
        stat = _fs.read_keyed(self._dir(path) / "cpu.stat")
        return CpuStat(
            usage_s=stat.get("usage_usec", 0) / 1e6, user_s=stat.get("user_usec", 0) / 1e6,
            system_s=stat.get("system_usec", 0) / 1e6, nr_periods=stat.get("nr_periods", 0),
            nr_throttled=stat.get("nr_throttled", 0), throttled_s=stat.get("throttled_usec", 0) / 1e6,
        )

    def _pressure_file(self, path: str, resource: str) -> Path:
        if resource not in RESOURCES:
            raise InvalidInput(f"PSI resource must be one of {', '.join(RESOURCES)}, got {resource!r}")
        self._require("psi")
        return self._dir(path) / f"{resource}.pressure"

    def pressure(self, path: str, resource: str = "memory") -> Pressure:
        file = self._pressure_file(path, resource)
        return parse_pressure(_fs.read(file), source=str(file))

    def pressure_trigger(self, path: str, resource: str = "memory", kind: str = "some",
                         stall_s: float = 0.15, window_s: float = 1.0) -> PressureTrigger:
        file = self._pressure_file(path, resource)
        if not file.parent.is_dir():
            raise CgroupGone(f"{file.parent}: the cgroup does not exist (removed, or never created)")
        return PressureTrigger(file, kind=kind, stall_s=stall_s, window_s=window_s)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(root={str(self.root_dir)!r})"


def _joiner(fds: list[int], then: Callable[[], Any] | None) -> Callable[[], None]:
    payload = b"0"

    def join() -> None:  # runs in the child between fork and exec: no allocation-heavy work
        for fd in fds:
            os.write(fd, payload)
        if then is not None:
            then()

    return join


def _rmdir_tree(directory: Path) -> bool:
    """rmdir `directory`, first its subdirectories (deepest first) when it has any.
    False if something is still busy (processes, or children that could not go)."""
    if _try_rmdir(directory):
        return True
    try:
        children = [e.path for e in os.scandir(directory) if e.is_dir(follow_symlinks=False)]
    except FileNotFoundError:
        return True
    except OSError as exc:
        raise _fs.translate(exc, directory, "list") from None
    if not children:
        return False  # busy with processes
    done = True
    for child in children:
        done &= _rmdir_tree(Path(child))
    return done and _try_rmdir(directory)


def _try_rmdir(directory: Path) -> bool:
    try:
        _fs.rmdir(directory)
    except CgroupGone:
        return True
    except CgroupBusy:
        return False
    return True


def pids_below(directories: list[Path]) -> set[int]:
    """Every pid in these cgroups and the cgroups below them."""
    pids: set[int] = set()
    for directory in directories:
        for root, _dirs, _files in os.walk(directory):
            try:
                pids |= {int(x) for x in _fs.read(Path(root) / "cgroup.procs").split()}
            except CgroupGone:
                continue
    return pids


def sweep_kill(directories: list[Path]) -> None:
    """SIGKILL every pid in these cgroups and below, in bounded rounds."""
    for _ in range(KILL_ROUNDS):
        pids = pids_below(directories)
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.001)
