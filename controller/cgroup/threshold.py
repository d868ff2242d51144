"""Kernel memcg usage-threshold notifications on cgroup v1 (Documentation/admin-guide/
cgroup-v1/memory.rst, "Memory thresholds"): an eventfd the kernel signals when the
cgroup's memory.usage_in_bytes crosses `threshold_bytes`, in either direction.

    t = UsageThreshold(tree.cgroup_dir("sb", "memory"), 900 << 20)
    epoll.register(t.fileno(), select.EPOLLIN)
    ...  t.read() -> the number of crossings since the last read (and when it was read)

Registered by writing "<eventfd> <fd of memory.usage_in_bytes> <bytes>" to the cgroup's
cgroup.event_control. The kernel checks thresholds every 128 page charges (about
512 KiB), hierarchically: a sandbox's threshold sees its tool calls' memory. It is
removed when the eventfd is closed or the cgroup goes. Pure cgroup v2 has no such
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
