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
        usage = -1
        try:
            usage = os.open(self.path / USAGE, os.O_RDONLY | os.O_CLOEXEC)
            fd = os.open(control, os.O_WRONLY | os.O_CLOEXEC)
            try:
                os.write(fd, f"{self._efd} {usage} {threshold_bytes}".encode())
            finally:
                os.close(fd)
        except OSError as exc:
            os.close(self._efd)
            self._efd = -1
            if not self.path.is_dir():
                raise CgroupGone(f"{self.path} was removed") from None
            raise AgentcgError(f"cannot register a memory threshold on {self.path}: {exc.strerror}") from None
        finally:
            if usage >= 0:
                os.close(usage)   # the kernel holds its own reference from here on

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
        try:
            return int((self.path / USAGE).read_text())
        except (OSError, ValueError):
            return None

    def close(self) -> None:
        if self._efd >= 0:
            os.close(self._efd)
            self._efd = -1


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
