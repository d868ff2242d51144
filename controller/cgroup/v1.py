"""cgroup v1 controller files (Documentation/admin-guide/cgroup-v1/): memory, cpu,
cpuacct, pids, freezer. Functions over one cgroup directory of one controller's mount.

v1 has no equivalent for several v2 knobs; the nearest ones, and what they do NOT do:
- memory.max  -> memory.limit_in_bytes (hard limit, OOM kill inside the cgroup).
  memory.memsw.* is left alone: swap accounting stays as the host set it.
- memory.low / memory.min -> memory.soft_limit_in_bytes. v1 has no protection: the
  soft limit only ranks cgroups as reclaim victims under GLOBAL pressure (usage above
  the soft limit goes first). With both given, the larger is written.
- memory.high -> none. v1 cannot throttle allocations at a threshold; we refuse
  (ControllerMissing) rather than pretend with the soft limit.
- memory.peak -> memory.max_usage_in_bytes.
- memory.events: max = memory.failcnt (times usage hit the limit), oom and oom_kill =
  memory.oom_control `oom_kill` (v1 does not count OOM invocations separately; per
  cgroup, not hierarchical); low and high read 0.
- cpu.weight w -> cpu.shares = max(2, round(w * 1024 / 100)) (100 <-> 1024 defaults).
- cpu.max -> cpu.cfs_quota_us / cpu.cfs_period_us (-1 = unlimited).
- cpu usage -> cpuacct.usage, cpuacct.usage_user, cpuacct.usage_sys (ns).
"""
from __future__ import annotations

import os
from pathlib import Path

from agentcg.controller.cgroup import _fs
from agentcg.controller.cgroup.base import CpuStat, MemoryEvents, MemoryStat
from agentcg.errors import CgroupBusy

V1_UNLIMITED = "-1"


def set_memory_limit(directory: Path, text: str) -> None:
    """`text` is bytes or "-1"."""
    try:
        _fs.write(directory / "memory.limit_in_bytes", text)
    except CgroupBusy:
        usage = _fs.read_int(directory / "memory.usage_in_bytes")
        raise CgroupBusy(
            f"{directory}: cannot lower memory.limit_in_bytes to {text} below the current usage "
            f"{usage} bytes: the kernel could not reclaim enough; kill or shrink the workload first"
        ) from None


def set_memory_soft_limit(directory: Path, text: str) -> None:
    _fs.write(directory / "memory.soft_limit_in_bytes", text)


def memory_current(directory: Path) -> int:
    return _fs.read_int(directory / "memory.usage_in_bytes")


def memory_peak(directory: Path) -> int:
    return _fs.read_int(directory / "memory.max_usage_in_bytes")


def memory_events(directory: Path) -> MemoryEvents:
    failcnt = _fs.read_int(directory / "memory.failcnt")
    oom_kill = _fs.read_keyed(directory / "memory.oom_control").get("oom_kill", 0)
    return MemoryEvents(low=0, high=0, max=failcnt, oom=oom_kill, oom_kill=oom_kill)


def memory_stat(directory: Path) -> MemoryStat:
    """Hierarchical totals (total_*), like v2's memory.stat."""
    stat = _fs.read_keyed(directory / "memory.stat")
    kmem = directory / "memory.kmem.usage_in_bytes"
    kernel = _fs.read_int(kmem) if kmem.exists() else 0
    return MemoryStat(
        anon_bytes=stat.get("total_rss", stat.get("rss", 0)),
        file_bytes=stat.get("total_cache", stat.get("cache", 0)),
        kernel_bytes=kernel,
        shmem_bytes=stat.get("total_shmem", stat.get("shmem", 0)),
        pgfault=stat.get("total_pgfault", stat.get("pgfault", 0)),
        pgmajfault=stat.get("total_pgmajfault", stat.get("pgmajfault", 0)),
        fields=stat,
    )


def cpu_shares(weight: int) -> int:
    return max(2, round(weight * 1024 / 100))


def set_cpu_weight(directory: Path, weight: int) -> None:
    _fs.write(directory / "cpu.shares", str(cpu_shares(weight)))


def set_cpu_max(directory: Path, quota_us: int | None, period_us: int) -> None:
    # Order matters: the kernel checks quota against period (and the parent) on each write.
    if quota_us is None:
        _fs.write(directory / "cpu.cfs_quota_us", V1_UNLIMITED)
        _fs.write(directory / "cpu.cfs_period_us", str(period_us))
    else:
        _fs.write(directory / "cpu.cfs_quota_us", V1_UNLIMITED)
        _fs.write(directory / "cpu.cfs_period_us", str(period_us))
        _fs.write(directory / "cpu.cfs_quota_us", str(quota_us))


def cpu_usage(cpuacct_dir: Path) -> tuple[float, float, float]:
    """-> (usage_s, user_s, system_s)."""
    usage_s = _fs.read_int(cpuacct_dir / "cpuacct.usage") / 1e9
    if (cpuacct_dir / "cpuacct.usage_user").exists():
        user_s = _fs.read_int(cpuacct_dir / "cpuacct.usage_user") / 1e9
        system_s = _fs.read_int(cpuacct_dir / "cpuacct.usage_sys") / 1e9
    else:  # older kernels: clock ticks only
        ticks = _fs.read_keyed(cpuacct_dir / "cpuacct.stat")
        hz = os.sysconf("SC_CLK_TCK")
        user_s, system_s = ticks.get("user", 0) / hz, ticks.get("system", 0) / hz
    return usage_s, user_s, system_s


def cpu_throttling(cpu_dir: Path) -> tuple[int, int, float]:
    """-> (nr_periods, nr_throttled, throttled_s) from the cpu controller's cpu.stat."""
    stat = _fs.read_keyed(cpu_dir / "cpu.stat")
    return stat.get("nr_periods", 0), stat.get("nr_throttled", 0), stat.get("throttled_time", 0) / 1e9


def cpu_stat(cpuacct_dir: Path, cpu_dir: Path) -> CpuStat:
    usage_s, user_s, system_s = cpu_usage(cpuacct_dir)
    nr_periods, nr_throttled, throttled_s = cpu_throttling(cpu_dir)
    return CpuStat(usage_s, user_s, system_s, nr_periods, nr_throttled, throttled_s)


def set_pids_max(directory: Path, text: str) -> None:
    _fs.write(directory / "pids.max", text)


def set_frozen(directory: Path, frozen: bool) -> None:
    _fs.write(directory / "freezer.state", "FROZEN" if frozen else "THAWED")


def freezer_state(directory: Path) -> str:
    """'THAWED', 'FREEZING' or 'FROZEN'."""
    return _fs.read(directory / "freezer.state").strip()
