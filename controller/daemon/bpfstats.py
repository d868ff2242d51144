"""BPF program run statistics for as long as the daemon holds an fd (BPF_ENABLE_STATS,
Linux 5.8+), instead of flipping the host-wide sysctl kernel.bpf_stats_enabled and
leaving it on after a crash: the kernel turns the stats off when the fd is closed.
"""
from __future__ import annotations

import ctypes
import os
import platform

BPF_ENABLE_STATS = 32
BPF_STATS_RUN_TIME = 0
_SYS_BPF = {"x86_64": 321, "aarch64": 280, "riscv64": 280, "ppc64le": 361, "s390x": 351}


def enable_bpf_stats() -> int | None:
    """An fd that keeps run-time stats on, or None where the kernel or arch refuses."""
    number = _SYS_BPF.get(platform.machine())
    if number is None:
        return None
    libc = ctypes.CDLL(None, use_errno=True)
    attr = (ctypes.c_uint8 * 128)()          # union bpf_attr; enable_stats.type is its first u32
    ctypes.c_uint32.from_buffer(attr).value = BPF_STATS_RUN_TIME
    fd = libc.syscall(ctypes.c_long(number), ctypes.c_int(BPF_ENABLE_STATS), attr, ctypes.c_uint(ctypes.sizeof(attr)))
    return fd if fd >= 0 else None


def disable_bpf_stats(fd: int | None) -> None:
    if fd is not None:
        os.close(fd)
