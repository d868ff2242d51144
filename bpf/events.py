"""ctypes mirrors of bpf/agentcg.h, and the typed values user space sees.

Every struct here has the same fields, in the same order, as its C twin;
tests/bpf/test_layout.py compiles the header and compares the sizes. The ring-buffer
record `Event` is decoded into one of the dataclasses below by `decode_event`; an
unknown kind becomes a decode error (a counter in the monitor), not a crash.
"""
from __future__ import annotations

import ctypes as ct
from dataclasses import dataclass

from agentcg.errors import BpfError

HIST_SLOTS = 32
COMM_LEN = 16
FILENAME_LEN = 256
BLOCK_DEV_SLOTS = 4

WATCH_STOP_AT_EXEC = 1   # acg_watch.flags
EV_EXEC = 1
EV_EXIT = 2
EV_RSS_THRESHOLD = 3
EV_OOM_VICTIM = 4
EV_RECLAIM_STALL = 5
EV_CGROUP_REMOVED = 6

ERR_RINGBUF_FULL = 0
ERR_TASKS_FULL = 1
ERR_MMS_FULL = 2
ERR_BLOCK_FULL = 3
ERR_INFLIGHT_FULL = 4
ERR_SLOTS = 8


class Watch(ct.Structure):
    _fields_ = [("rss_threshold_bytes", ct.c_uint64), ("flags", ct.c_uint32), ("fired", ct.c_uint32)]


class Counters(ct.Structure):
    _fields_ = [
        ("rss_bytes", ct.c_int64),
        ("rss_peak_bytes", ct.c_int64),
        ("page_faults", ct.c_uint64),
        ("reclaim_ns", ct.c_uint64),
        ("reclaim_count", ct.c_uint64),
        ("cpu_ns", ct.c_uint64),
        ("forks", ct.c_uint64),
        ("threads", ct.c_uint64),
        ("execs", ct.c_uint64),
        ("exits", ct.c_uint64),
        ("oom_kills", ct.c_uint64),
        ("block_devs", ct.c_uint32 * BLOCK_DEV_SLOTS),
        ("block_devs_more", ct.c_uint32),
        ("pad", ct.c_uint32),
        ("runq_slots", ct.c_uint64 * HIST_SLOTS),
    ]


class Task(ct.Structure):
    _fields_ = [("cgroup_id", ct.c_uint64), ("ppid", ct.c_uint32), ("tgid", ct.c_uint32),
                ("base_runtime_ns", ct.c_uint64), ("base_run_delay_ns", ct.c_uint64),
                ("base_pcount", ct.c_uint64), ("has_base", ct.c_uint32), ("flags", ct.c_uint32)]


class Mm(ct.Structure):
    _fields_ = [("cgroup_id", ct.c_uint64), ("file_bytes", ct.c_int64),
                ("anon_bytes", ct.c_int64), ("shmem_bytes", ct.c_int64),
                ("base_file_bytes", ct.c_int64), ("base_anon_bytes", ct.c_int64),
                ("base_shmem_bytes", ct.c_int64)]


class Stamp(ct.Structure):
    _fields_ = [("cgroup_id", ct.c_uint64), ("ns", ct.c_uint64)]


class Exit(ct.Structure):
    _fields_ = [("cgroup_id", ct.c_uint64), ("exit_code", ct.c_int32), ("signal", ct.c_int32)]


class BlkKey(ct.Structure):
    _fields_ = [("cgroup_id", ct.c_uint64), ("dev", ct.c_uint32), ("pad", ct.c_uint32)]


class BlkStats(ct.Structure):
    _fields_ = [("read_bytes", ct.c_uint64), ("write_bytes", ct.c_uint64),
                ("read_ios", ct.c_uint64), ("write_ios", ct.c_uint64),
                ("read_latency_ns", ct.c_uint64), ("write_latency_ns", ct.c_uint64)]


class IoKey(ct.Structure):
    _fields_ = [("sector", ct.c_uint64), ("dev", ct.c_uint32), ("pad", ct.c_uint32)]


class Io(ct.Structure):
    _fields_ = [("cgroup_id", ct.c_uint64), ("issue_ns", ct.c_uint64),
                ("bytes", ct.c_uint32), ("write", ct.c_uint32)]


class Event(ct.Structure):
    _fields_ = [
        ("ktime_ns", ct.c_uint64),
        ("cgroup_id", ct.c_uint64),
        ("value", ct.c_uint64),
        ("aux", ct.c_uint64),
        ("kind", ct.c_uint32),
        ("pid", ct.c_uint32),
        ("ppid", ct.c_uint32),
        ("exit_code", ct.c_int32),
        ("signal", ct.c_int32),
        ("pad", ct.c_uint32),
        ("comm", ct.c_char * COMM_LEN),
        ("filename", ct.c_char * FILENAME_LEN),
    ]


# bytes of a short record (every kind but EV_EXEC): all but the file name
EVENT_HEAD = Event.filename.offset

# C struct name -> ctypes mirror, for the layout test
C_STRUCTS: dict[str, type[ct.Structure]] = {
    "acg_watch": Watch, "acg_counters": Counters, "acg_task": Task,
    "acg_mm": Mm, "acg_stamp": Stamp, "acg_exit": Exit, "acg_blk_key": BlkKey,
    "acg_blk_stats": BlkStats, "acg_io_key": IoKey, "acg_io": Io, "acg_event": Event,
}


@dataclass(frozen=True)
class BaseEvent:
    """A ring-buffer event. `monotonic_s` is the kernel's CLOCK_MONOTONIC at the event
    (comparable with `time.monotonic()`), so reaction latency is `time.monotonic() - monotonic_s`."""

    monotonic_s: float
    cgroup_id: int
    pid: int


@dataclass(frozen=True)
class ExecEvent(BaseEvent):
    ppid: int           # tgid of the parent that forked it; 0 if it was forked unwatched
    comm: str
    filename: str
    stopped: bool = False   # the kernel stopped it (watch(stop_at_exec=True)): send SIGCONT


@dataclass(frozen=True)
class ExitEvent(BaseEvent):
    ppid: int
    comm: str
    exit_code: int | None   # from exit_group(2); None when killed or unseen
    signal: int | None      # the fatal signal, None when it exited by itself


@dataclass(frozen=True)
class RssThresholdEvent(BaseEvent):
    """The cgroup's RSS reached its threshold (once per crossing; re-armed below it)."""

    rss_bytes: int
    threshold_bytes: int
    comm: str


@dataclass(frozen=True)
class OomVictimEvent(BaseEvent):
    rss_bytes: int
    comm: str


@dataclass(frozen=True)
class ReclaimStallEvent(BaseEvent):
    stall_s: float
    comm: str


@dataclass(frozen=True)
class CgroupRemovedEvent(BaseEvent):
    """A watched cgroup was removed; the monitor has read its final counters and
    deleted its map entries (`BpfMonitor.counters` still answers for it a while)."""


def _text(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode("utf-8", "replace")


def decode_event(raw: Event) -> BaseEvent:
    """One ring-buffer record -> its typed event. Unknown kinds raise BpfError."""
    common = dict(monotonic_s=raw.ktime_ns / 1e9, cgroup_id=raw.cgroup_id, pid=raw.pid)
    kind = raw.kind
    if kind == EV_EXEC:
        return ExecEvent(**common, ppid=raw.ppid, comm=_text(raw.comm), filename=_text(raw.filename),
                         stopped=raw.aux == 1)
    if kind == EV_EXIT:
        return ExitEvent(**common, ppid=raw.ppid, comm=_text(raw.comm),
                         exit_code=None if raw.signal or raw.exit_code < 0 else raw.exit_code,
                         signal=raw.signal or None)
    if kind == EV_RSS_THRESHOLD:
        return RssThresholdEvent(**common, rss_bytes=raw.value, threshold_bytes=raw.aux, comm=_text(raw.comm))
    if kind == EV_OOM_VICTIM:
        return OomVictimEvent(**common, rss_bytes=raw.value, comm=_text(raw.comm))
    if kind == EV_RECLAIM_STALL:
        return ReclaimStallEvent(**common, stall_s=raw.value / 1e9, comm=_text(raw.comm))
    if kind == EV_CGROUP_REMOVED:
        return CgroupRemovedEvent(**common)
    raise BpfError(f"ring buffer: unknown event kind {kind}; bpf/agentcg.h and bpf/events.py disagree")
