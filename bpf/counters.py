"""What `BpfMonitor` (monitor.py) reads back, typed: one cgroup's counters, its block
devices, the programs' and the monitor's own statistics; and the helpers that make them
(a cgroup's id, a run-queue histogram's quantile)."""
from __future__ import annotations

import os
from dataclasses import dataclass

from agentcg.errors import InvalidInput



@dataclass(frozen=True)
class BlockDeviceCounters:
    major: int
    minor: int
    read_bytes: int
    write_bytes: int
    read_ios: int
    write_ios: int
    read_latency_s: float    # sum over the reads; divide by read_ios for the mean
    write_latency_s: float


@dataclass(frozen=True)
class CgroupCounters:
    """What the programs counted for one cgroup. A field is None when its concern is not
    loaded (not measured), never zero."""

    cgroup_id: int
    rss_bytes: int | None
    rss_peak_bytes: int | None
    page_faults: int | None
    reclaim_s: float | None
    reclaim_count: int | None
    oom_kills: int | None
    cpu_s: float | None
    runq_samples: int | None
    runq_latency_p50_s: float | None
    runq_latency_p99_s: float | None
    runq_histogram: tuple[int, ...] | None   # slot i: waits in [2**i, 2**(i+1)) ns
    forks: int | None
    threads: int | None
    execs: int | None
    exits: int | None
    block_read_bytes: int | None
    block_write_bytes: int | None
    block_devices: tuple[BlockDeviceCounters, ...] | None


@dataclass(frozen=True)
class ProgramStats:
    name: str
    tracepoint: str
    run_count: int | None     # None unless BPF run-time stats are on (BPF_ENABLE_STATS)
    run_time_s: float | None
    raw: bool = False         # attached as a raw tracepoint


@dataclass(frozen=True)
class MonitorStats:
    concerns: tuple[str, ...]
    watched: int
    events_received: int
    ringbuf_full: int                 # events lost: the ring buffer had no room
    map_full: dict[str, int]          # map name -> inserts refused because it was full
    decode_errors: int
    programs: tuple[ProgramStats, ...]


def cgroup_id_of(path: str | os.PathLike) -> int:
    """The cgroup id of a v2 cgroup directory (its inode number)."""
    try:
        return os.stat(path).st_ino
    except FileNotFoundError:
        raise InvalidInput(f"cgroup {path} does not exist; create it first") from None


def runq_percentile_s(histogram: tuple[int, ...], q: float) -> float | None:
    """The q-quantile (0..1) of a log2 histogram, interpolated linearly inside its slot."""
    total = sum(histogram)
    if total == 0:
        return None
    target = q * total
    seen = 0
    for slot, count in enumerate(histogram):
        if count and seen + count >= target:
            low = float(2**slot)
            return (low + (target - seen) / count * low) / 1e9
        seen += count
    return float(2 ** len(histogram)) / 1e9
