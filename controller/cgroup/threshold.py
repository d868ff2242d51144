"""Kernel memcg usage-threshold notifications on cgroup v1 (Documentation/admin-guide/
cgroup-v1/memory.rst, "Memory thresholds"): an eventfd the kernel signals when the
cgroup's memory.usage_in_bytes crosses `threshold_bytes`, in either direction.

    t = UsageThreshold(tree.cgroup_dir("sb", "memory"), 900 << 20)
    epoll.register(t.fileno(), select.EPOLLIN)
    ...  t.read() -> the number of crossings since the last read (and when it was read)

Registered by writing "<eventfd> <fd of memory.usage_in_bytes> <bytes>" to the cgroup's
cgroup.event_control. The kernel checks thresholds every 128 page charges (about
512 KiB), hierarchically: a sandbox's threshold sees its tool calls' memory; a tool
call's own memory cgroup gets one too. It is removed when the eventfd is closed or the
cgroup goes (the kernel then signals the eventfd once: usage_bytes() is None). Pure cgroup v2 has no such
interface (memory.events reports only high/max/oom): there the daemon uses the eBPF
RSS threshold when loaded, else PSI and its tick.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import time
from pathlib import Path

from agentcg.errors import AgentcgError, CgroupGone, ControllerMissing

EVENT_CONTROL = "cgroup.event_control"
USAGE = "memory.usage_in_bytes"


class UsageThreshold:
    def __init__(self, memcg_dir: Path, threshold_bytes: int) -> None:
        if isinstance(threshold_bytes, bool) or not isinstance(threshold_bytes, int) or threshold_bytes <= 0:
            raise ValueError(f"threshold must be a positive number of bytes, got {threshold_bytes!r}")
        self.path = Path(memcg_dir)
        self.threshold_bytes = threshold_bytes
        control = self.path / EVENT_CONTROL
        if not control.exists():
            if not self.path.is_dir():
                raise CgroupGone(f"{self.path} does not exist")
            raise ControllerMissing(f"{control} is missing: the kernel has no cgroup v1 memory thresholds "
                                    "(CONFIG_MEMCG_V1); the daemon reacts through eBPF or PSI instead")
        self._efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._usage = -1          # kept open: usage_bytes() is one pread, no open/stat/close
        try:
            self._usage = os.open(self.path / USAGE, os.O_RDONLY | os.O_CLOEXEC)
            fd = os.open(control, os.O_WRONLY | os.O_CLOEXEC)
            try:
                os.write(fd, f"{self._efd} {self._usage} {threshold_bytes}".encode())
            finally:
                os.close(fd)
        except OSError as exc:
            self.close()
            if not self.path.is_dir():
                raise CgroupGone(f"{self.path} was removed") from None
            raise AgentcgError(f"cannot register a memory threshold on {self.path}: {exc.strerror}") from None

    def fileno(self) -> int:
        return self._efd

    def read(self) -> tuple[int, float]:
        """(crossings since the last read, time.monotonic() of this read); (0, t) if none."""
        try:
            count = os.eventfd_read(self._efd)
        except BlockingIOError:
            count = 0
        return count, time.monotonic()

    def usage_bytes(self) -> int | None:
        """memory.usage_in_bytes now (the page counter the threshold compares with); None
        once the cgroup is gone."""
        try:
            return int(os.pread(self._usage, 32, 0))
        except (OSError, ValueError):
            return None

    def close(self) -> None:
        for name in ("_efd", "_usage"):
            fd = getattr(self, name)
            if fd >= 0:
                os.close(fd)
                setattr(self, name, -1)


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class _Itimerspec(ctypes.Structure):
    _fields_ = [("it_interval", _Timespec), ("it_value", _Timespec)]


_CLOCK_MONOTONIC = 1
_libc = None


class Ticker:
    """A periodic CLOCK_MONOTONIC timerfd (timerfd_create(2); Python's own os.timerfd_*
    arrives only in 3.13), readable in epoll every `period_s`: the daemon's short watch of
    a call close to its threshold (reaction.py)."""

    def __init__(self, period_s: float) -> None:
        global _libc
        if not 0 < period_s < 1:
            raise ValueError(f"a ticker's period must be in (0, 1) s, got {period_s!r}")
        if _libc is None:
            _libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        self._fd = _libc.timerfd_create(_CLOCK_MONOTONIC, os.O_NONBLOCK | os.O_CLOEXEC)
        if self._fd < 0:
            raise AgentcgError(f"timerfd_create: {os.strerror(ctypes.get_errno())}")
        ns = int(period_s * 1e9)
        spec = _Itimerspec(_Timespec(0, ns), _Timespec(0, ns))
        if _libc.timerfd_settime(self._fd, 0, ctypes.byref(spec), None) != 0:
            err = ctypes.get_errno()
            self.close()
            raise AgentcgError(f"timerfd_settime: {os.strerror(err)}")

    def fileno(self) -> int:
        return self._fd

    def read(self) -> int:
        """Expirations since the last read (0 if none)."""
        try:
            return int.from_bytes(os.read(self._fd, 8), "little")
        except BlockingIOError:
            return 0

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


EVENTS = "memory.events"
EVENT_KEYS = ("high", "max", "oom", "oom_kill")


class MemoryEventsWatch:
    """Pure cgroup v2: `memory.events` of one cgroup, for epoll (EPOLLPRI: the kernel's
    kernfs notification when a counter changes). It reports only high/max/oom/oom_kill,
    not usage crossings: with memory.high on a throttled call or memory.max on a sandbox,
    the daemon hears at once when a call presses against it.

        w = MemoryEventsWatch(tree.cgroup_dir("sb", "v2"))
        epoll.register(w.fileno(), select.EPOLLPRI | select.EPOLLERR)
        ...  w.changed() -> {"high": 3} (how much each counter grew since the last read)
    """

    def __init__(self, cgroup_dir: Path) -> None:
        self.path = Path(cgroup_dir) / EVENTS
        try:
            self._fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            if not self.path.parent.is_dir():
                raise CgroupGone(f"{self.path.parent} does not exist") from None
            raise ControllerMissing(f"{self.path} is missing: the memory controller is not enabled there") from None
        self._last = self._read() or {}

    def _read(self) -> dict[str, int] | None:
        try:
            text = os.pread(self._fd, 4096, 0).decode()    # also re-arms the kernfs notification
        except OSError:
            return None
        out = {}
        for line in text.splitlines():
            key, _, value = line.partition(" ")
            if key in EVENT_KEYS and value.strip().isdigit():
                out[key] = int(value)
        return out

    def changed(self) -> dict[str, int] | None:
        """How much each counter grew since the last read; None when the cgroup is gone."""
        now = self._read()
        if now is None:
            return None
        grown = {k: v - self._last.get(k, 0) for k, v in now.items() if v > self._last.get(k, 0)}
        self._last = now
        return grown

    def fileno(self) -> int:
        return self._fd

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
