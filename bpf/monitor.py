"""Compiles, loads and attaches the agentcg BPF programs once, and reads them back typed.

    with BpfMonitor(concerns=("process", "memory", "sched", "block")) as mon:
        mon.watch(cgroup_id, rss_threshold_bytes=512 * 2**20)
        events = mon.poll(0.1)            # ExecEvent, RssThresholdEvent, ...
        final = mon.forget(cgroup_id)     # CgroupCounters, then no map entry is left

`bpf/shared.bpf.c` (maps every concern uses) and one `bpf/<concern>.bpf.c` per concern
are compiled as one bcc module, so the maps are shared. A program is attached to the
tracepoint named by its argument type (`struct tracepoint__<category>__<event>`). Only
cgroups passed to `watch()` are tracked; map sizes are the constants below, passed as
-D defines. bcc comes from the distribution package python3-bpfcc. What it reads back
(`CgroupCounters`, `MonitorStats`, ...) is defined in counters.py.
"""
from __future__ import annotations

import collections
import ctypes as ct
import re
from pathlib import Path
from typing import Any

from agentcg.bpf import events as ev
from agentcg.bpf.btf import kernel_offsets
from agentcg.bpf.counters import (  # noqa: F401  (cgroup_id_of: importable from here, as before)
    BlockDeviceCounters, CgroupCounters, MonitorStats, ProgramStats, cgroup_id_of, runq_percentile_s,
)
from agentcg.errors import AgentcgError, BpfError, InvalidInput, ProcessGone
from agentcg.procfs import PROC

CONCERNS = ("process", "memory", "sched", "block")          # loaded by default
# opt-in: faults runs on every page fault (RSS from rss_stat, user faults), switches on
# every context switch (per-slice CPU and waits, moved-in tasks found), exit_codes on every
# system call (a syscall tracepoint moves every task onto the slow syscall path)
OPTIONAL_CONCERNS = ("faults", "switches", "exit_codes")
ALL_CONCERNS = CONCERNS + OPTIONAL_CONCERNS
BPF_DIR = Path(__file__).resolve().parent

MAX_CGROUPS = 4096
MAX_TASKS = 65536
MAX_MMS = 65536
MAX_BLOCK_KEYS = 8192
MAX_INFLIGHT_IO = 16384
RINGBUF_PAGES = 256              # 1 MiB: about 3,400 events between two polls
RECLAIM_STALL_S = 0.010          # a reclaim longer than this sends a ReclaimStallEvent
WAKE_BATCH_EVENTS = 256         # non-urgent events submitted per reader wake-up (agentcg.h)
WAKE_AFTER_S = 0.100            # ... or once the oldest unannounced one is this old
REMOVED_KEPT = 1024              # final counters of removed cgroups kept for a late forget()

# maps with one entry per something; `live_entries()` reports them
_HASH_MAPS = {
    "shared": ("watched", "counters", "tasks"),
    "process": ("exits",),
    "memory": ("reclaim_start",),
    "faults": ("mms", "mm_fresh"),
    "sched": (),
    "block": ("io_owner", "io_inflight", "block_stats"),
    "switches": (),
    "exit_codes": (),
}
# A program `acg_<concern>__<category>__<event>` is attached to that tracepoint: as a raw
# tracepoint when it takes `struct bpf_raw_tracepoint_args *ctx`, else as a classic one.
_PROGRAM_RE = re.compile(r"^int (acg_\w+?__(\w+?)__(\w+))\((struct tracepoint__\w+ \*args|"
                         r"struct bpf_raw_tracepoint_args \*ctx)\)", re.M)
_ERROR_NAMES = {ev.ERR_TASKS_FULL: "tasks", ev.ERR_MMS_FULL: "mms",
                ev.ERR_BLOCK_FULL: "block_stats", ev.ERR_INFLIGHT_FULL: "io_inflight"}


def load_bcc() -> Any:
    """The bcc module, or BpfError with how to install it."""
    try:
        import bcc
    except ImportError:
        raise BpfError("bcc is not importable: install the Debian/Ubuntu package python3-bpfcc "
                       "(never the PyPI package 'bcc'); `bash scripts/host.sh setup` does it") from None
    return bcc


class BpfMonitor:
    """The loaded programs and their maps; one per process is enough."""

    def __init__(self, concerns: tuple[str, ...] | list[str] = CONCERNS, *,
                 reclaim_stall_s: float = RECLAIM_STALL_S, bpf_dir: Path = BPF_DIR) -> None:
        unknown = [c for c in concerns if c not in ALL_CONCERNS]
        if unknown or not concerns:
            raise InvalidInput(f"BPF concerns {unknown or '(none)'} unknown; choose from {', '.join(ALL_CONCERNS)}")
        if "exit_codes" in concerns and "process" not in concerns:
            raise InvalidInput("the BPF concern exit_codes needs the concern process as well")
        if "switches" in concerns and "sched" not in concerns:
            raise InvalidInput("the BPF concern switches needs the concern sched as well")
        if "sched" in concerns and "process" not in concerns:
            # the exit program charges each task's scheduler counters (bpf/sched.bpf.c)
            raise InvalidInput("the BPF concern sched needs the concern process as well")
        if "faults" in concerns and "process" not in concerns:
            # the exec program tells the faults concern which mms start empty (agentcg.h, acg_mm)
            raise InvalidInput("the BPF concern faults needs the concern process as well")
        if not 0 < reclaim_stall_s < 60:
            raise InvalidInput(f"reclaim_stall_s must be in (0, 60) seconds, got {reclaim_stall_s}")
        self.concerns = tuple(c for c in ALL_CONCERNS if c in concerns)
        self._b: Any = None
        self._watched: set[int] = set()
        self._flags: dict[int, int] = {}
        self._removed: collections.OrderedDict[int, CgroupCounters] = collections.OrderedDict()
        self._pending: list[ev.BaseEvent] = []
        self._events_received = 0
        self._decode_errors = 0
        self._programs: list[tuple[str, str, bool]] = []   # (function, category:event, raw)
        self._load(bpf_dir, reclaim_stall_s)

    # -- loading ---------------------------------------------------------------------
    def _load(self, bpf_dir: Path, reclaim_stall_s: float) -> None:
        bcc = load_bcc()
        parts = []
        for name in ("shared",) + self.concerns:
            path = bpf_dir / f"{name}.bpf.c"
            try:
                text = path.read_text()
            except OSError as exc:
                raise BpfError(f"cannot read {path}: {exc.strerror}") from None
            for fn, category, event, signature in _PROGRAM_RE.findall(text):
                if not fn.startswith(f"acg_{name}__"):
                    raise BpfError(f"{path}: program {fn} must be named acg_{name}__<category>__<event>")
                self._programs.append((fn, f"{category}:{event}", "bpf_raw_tracepoint_args" in signature))
            parts.append(text)
        offsets = kernel_offsets()
        cflags = [
            f"-I{bpf_dir}",
            f"-DMAX_CGROUPS={MAX_CGROUPS}", f"-DMAX_TASKS={MAX_TASKS}", f"-DMAX_MMS={MAX_MMS}",
            f"-DMAX_BLOCK_KEYS={MAX_BLOCK_KEYS}", f"-DMAX_INFLIGHT_IO={MAX_INFLIGHT_IO}",
            f"-DRINGBUF_PAGES={RINGBUF_PAGES}", f"-DRECLAIM_STALL_NS={int(reclaim_stall_s * 1e9)}ULL",
            f"-DWAKE_BATCH_EVENTS={WAKE_BATCH_EVENTS}", f"-DWAKE_AFTER_NS={int(WAKE_AFTER_S * 1e9)}ULL",
        ] + [f"-D{name}={value}" for name, value in offsets.items()] + [
            f"-DACG_CONCERN_{name.upper()}" for name in self.concerns]
        try:
            self._b = bcc.BPF(text="\n".join(parts).encode(), cflags=cflags)
        except Exception as exc:  # bcc raises bare Exception for compile and load failures
            raise BpfError(f"compiling/loading the BPF programs ({', '.join(self.concerns)}) failed: {exc}; "
                           "check kernel headers (`bash scripts/host.sh setup`) and `agentcg doctor`") from None
        try:
            self._b[b"events"].open_ring_buffer(self._on_event)
        except Exception as exc:
            self.close()
            raise BpfError(f"opening the ring buffer failed: {exc}") from None
        self.attach()

    def attach(self) -> None:
        """Attach every program (done at load; again after detach())."""
        b = self._require_open()
        try:
            for fn, tracepoint, raw in self._programs:
                if raw and tracepoint.split(":")[1].encode() not in b.raw_tracepoint_fds:
                    b.attach_raw_tracepoint(tp=tracepoint.split(":")[1].encode(), fn_name=fn.encode())
                elif not raw and tracepoint.encode() not in b.tracepoint_fds:
                    b.attach_tracepoint(tp=tracepoint.encode(), fn_name=fn.encode())
        except Exception as exc:
            self.close()
            raise BpfError(f"attaching the BPF programs failed: {exc}; is tracefs mounted and are you root?") from None

    def detach(self) -> None:
        """Detach every program; maps, counters and the ring buffer stay, so attach() resumes
        (benchmark (3) measures the same loaded programs attached and not)."""
        b = self._require_open()
        for tp in list(b.raw_tracepoint_fds):
            b.detach_raw_tracepoint(tp=tp)
        for tp in list(b.tracepoint_fds):
            b.detach_tracepoint(tp=tp)

    def _on_event(self, ctx: Any, data: Any, size: int) -> None:
        self._events_received += 1
        if size < ev.EVENT_HEAD:
            self._decode_errors += 1
            return
        raw = ev.Event()    # a short record (all kinds but exec) leaves the file name out
        ct.memmove(ct.addressof(raw), data, min(size, ct.sizeof(raw)))
        try:
            self._pending.append(ev.decode_event(raw))
        except BpfError:
            self._decode_errors += 1

    def _require_open(self) -> Any:
        if self._b is None:
            raise BpfError("the BPF monitor is closed")
        return self._b

    # -- watching ----------------------------------------------------------------------
    def watch(self, cgroup_id: int, rss_threshold_bytes: int | None = None, *,
              stop_at_exec: bool = False) -> None:
        """Start counting for `cgroup_id` (a v2 cgroup id, see `cgroup_id_of`). Watching a
        watched cgroup again only changes its threshold and flags.

        stop_at_exec: the kernel stops (SIGSTOP) every process that execs in this cgroup and
        marks its ExecEvent `stopped`; the reader of poll() MUST send it SIGCONT."""
        b = self._require_open()
        key = ct.c_uint64(_cgroup_id(cgroup_id))
        threshold = _threshold(rss_threshold_bytes)
        if cgroup_id not in self._watched:
            if len(self._watched) >= MAX_CGROUPS:
                raise BpfError(f"already watching {MAX_CGROUPS} cgroups (MAX_CGROUPS); forget() some first")
            b[b"counters"][key] = ev.Counters()
            self._removed.pop(cgroup_id, None)
        flags = ev.WATCH_STOP_AT_EXEC if stop_at_exec else 0
        self._flags[cgroup_id] = flags
        self._count_stop_watches()   # before the flag is visible, so no exec misses its stop
        b[b"watched"][key] = ev.Watch(threshold, flags, 0)
        self._watched.add(cgroup_id)

    def _count_stop_watches(self) -> None:
        """stop_watches[0]: the exec program looks `watched` up only while it is non-zero."""
        n = sum(1 for f in self._flags.values() if f & ev.WATCH_STOP_AT_EXEC)
        self._b[b"stop_watches"][ct.c_int(0)] = ct.c_uint32(n)

    def set_rss_threshold(self, cgroup_id: int, rss_threshold_bytes: int | None) -> None:
        """Set (or clear with None) the RSS threshold; also re-arms a threshold that fired."""
        b = self._require_open()
        self._require_watched(cgroup_id)
        b[b"watched"][ct.c_uint64(cgroup_id)] = ev.Watch(_threshold(rss_threshold_bytes),
                                                         self._flags.get(cgroup_id, 0), 0)

    def watch_pid(self, pid: int, cgroup_id: int) -> None:
        """Track a process (all its threads) that joined a watched cgroup after it started."""
        b = self._require_open()
        self._require_watched(cgroup_id)
        if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
            raise InvalidInput(f"pid must be a positive integer, got {pid!r}")
        try:
            ppid = PROC.stat(pid).ppid
            tids = PROC.tids(pid)
        except ProcessGone:
            raise InvalidInput(f"process {pid} does not exist (it may have exited already)") from None
        tasks = b[b"tasks"]
        for tid in tids:
            tasks[ct.c_uint32(tid)] = ev.Task(cgroup_id, ppid, pid, *_sched_bases(pid, tid))

    def watched(self) -> frozenset[int]:
        return frozenset(self._watched)

    def _require_watched(self, cgroup_id: int) -> None:
        if cgroup_id not in self._watched:
            raise InvalidInput(f"cgroup id {cgroup_id} is not watched; call watch({cgroup_id}) first")

    # -- reading -----------------------------------------------------------------------
    def counters(self, cgroup_id: int) -> CgroupCounters:
        """The counters of a watched cgroup (or of one removed recently)."""
        self._require_open()
        if cgroup_id in self._removed:
            return self._removed[cgroup_id]
        self._require_watched(cgroup_id)
        return self._read(cgroup_id)

    def _read(self, cgroup_id: int) -> CgroupCounters:
        b = self._b
        key = ct.c_uint64(cgroup_id)
        try:
            c = b[b"counters"][key]
        except KeyError:
            c = ev.Counters()
        has = self.concerns.__contains__
        hist: tuple[int, ...] | None = None
        if has("sched"):
            hist = tuple(int(v) for v in c.runq_slots)
        devices: tuple[BlockDeviceCounters, ...] | None = None
        if has("block"):
            devices = tuple(
                BlockDeviceCounters(major=k.dev >> 20, minor=k.dev & 0xFFFFF, read_bytes=v.read_bytes,
                                    write_bytes=v.write_bytes, read_ios=v.read_ios, write_ios=v.write_ios,
                                    read_latency_s=v.read_latency_ns / 1e9, write_latency_s=v.write_latency_ns / 1e9)
                for k, v in self._block_entries(cgroup_id, c))

        def when(concern: str, value: Any) -> Any:
            return value if has(concern) else None

        return CgroupCounters(
            cgroup_id=cgroup_id,
            rss_bytes=when("faults", max(0, c.rss_bytes)),
            rss_peak_bytes=when("faults", max(0, c.rss_peak_bytes)),
            page_faults=when("faults", c.page_faults),
            reclaim_s=when("memory", c.reclaim_ns / 1e9),
            reclaim_count=when("memory", c.reclaim_count),
            oom_kills=when("memory", c.oom_kills),
            cpu_s=when("sched", c.cpu_ns / 1e9),
            runq_samples=sum(hist) if hist is not None else None,
            runq_latency_p50_s=runq_percentile_s(hist, 0.50) if hist is not None else None,
            runq_latency_p99_s=runq_percentile_s(hist, 0.99) if hist is not None else None,
            runq_histogram=hist,
            forks=when("process", c.forks),
            threads=when("process", c.threads),
            execs=when("process", c.execs),
            exits=when("process", c.exits),
            block_read_bytes=sum(d.read_bytes for d in devices) if devices is not None else None,
            block_write_bytes=sum(d.write_bytes for d in devices) if devices is not None else None,
            block_devices=devices,
        )

    def forget(self, cgroup_id: int) -> CgroupCounters:
        """Stop watching; return the final counters and delete every map entry of the cgroup."""
        b = self._require_open()
        if cgroup_id in self._removed:
            self._purge(cgroup_id)
            return self._removed.pop(cgroup_id)
        self._require_watched(cgroup_id)
        try:
            del b[b"watched"][ct.c_uint64(cgroup_id)]
        except KeyError:
            pass  # removed by the kernel (cgroup_rmdir) a moment ago
        self._watched.discard(cgroup_id)
        self._flags.pop(cgroup_id, None)
        self._count_stop_watches()
        final = self._read(cgroup_id)
        self._purge(cgroup_id)
        return final

    def _block_entries(self, cgroup_id: int, c: Any) -> list[tuple[Any, Any]]:
        """block_stats keys and values of one cgroup: looked up by the devices its counters
        name, or (more devices than BLOCK_DEV_SLOTS) by a walk of the map."""
        table = self._b[b"block_stats"]
        if c.block_devs_more:
            return [(k, v) for k, v in table.items() if k.cgroup_id == cgroup_id]
        out = []
        for dev in c.block_devs:
            if not dev:
                break
            key = ev.BlkKey(cgroup_id, dev, 0)
            try:
                out.append((key, table[key]))
            except KeyError:
                pass
        return out

    def _purge(self, cgroup_id: int) -> None:
        """Delete the cgroup's keys: a few direct deletes, no map walk. Per-task entries
        are removed by the programs when the task exits (or ages out of an LRU map)."""
        b = self._b
        key = ct.c_uint64(cgroup_id)
        c = None
        if "block" in self.concerns:
            try:
                c = b[b"counters"][key]
            except KeyError:
                pass
        try:
            del b[b"counters"][key]
        except KeyError:
            pass
        if c is not None:
            table = b[b"block_stats"]
            for k, _v in self._block_entries(cgroup_id, c):
                try:
                    del table[k]
                except KeyError:
                    pass

    def poll(self, timeout_s: float = 0.0) -> list[ev.BaseEvent]:
        """Events from the ring buffer, waiting at most `timeout_s` for the first one.
        A CgroupRemovedEvent has already been handled: counters kept, entries deleted."""
        b = self._require_open()
        if timeout_s < 0:
            raise InvalidInput(f"poll timeout must be >= 0 seconds, got {timeout_s}")
        if timeout_s > 0:
            # returns early only when woken (urgent events, or every WAKE_BATCH_EVENTS)
            b.ring_buffer_poll(timeout=max(1, int(timeout_s * 1000)))
        b.ring_buffer_consume()   # what was submitted without a wake-up
        out, self._pending = self._pending, []
        for event in out:
            if isinstance(event, ev.CgroupRemovedEvent) and event.cgroup_id in self._watched:
                self._watched.discard(event.cgroup_id)
                self._flags.pop(event.cgroup_id, None)
                self._count_stop_watches()
                self._removed[event.cgroup_id] = self._read(event.cgroup_id)
                while len(self._removed) > REMOVED_KEPT:
                    self._removed.popitem(last=False)
                self._purge(event.cgroup_id)
        return out

    def fileno(self) -> int:
        """An fd readable when ring-buffer records wait (libbpf ring_buffer__epoll_fd, an
        epoll fd itself): put it in an event loop, then poll(0) when it is ready. It turns
        readable when the programs wake the reader: at once for an urgent event (an RSS
        threshold, an OOM victim, a reclaim stall, a process stopped at exec), else every
        WAKE_BATCH_EVENTS events, or WAKE_AFTER_S after an unannounced one when another
        follows. A lone exec or exit event wakes nobody (a wake-up cost the exiting task
        15-20 us), so ALSO call poll(0) on the caller's tick."""
        b = self._require_open()
        manager = getattr(b, "_ringbuf_manager", None)
        if not manager:
            raise BpfError("the ring buffer is not open")
        lib = load_bcc().libbcc.lib
        lib.ring_buffer__epoll_fd.argtypes = [ct.c_void_p]
        lib.ring_buffer__epoll_fd.restype = ct.c_int
        fd = lib.ring_buffer__epoll_fd(ct.c_void_p(manager))
        if fd < 0:
            raise BpfError(f"ring_buffer__epoll_fd failed ({fd})")
        return fd

    def live_entries(self) -> dict[str, int]:
        """Map name -> number of entries, for every hash map loaded."""
        b = self._require_open()
        return {name: sum(1 for _ in b[name.encode()].keys())
                for concern in ("shared",) + self.concerns for name in _HASH_MAPS[concern]}

    def stats(self) -> MonitorStats:
        b = self._require_open()
        errors = [0] * ev.ERR_SLOTS
        for slot in range(ev.ERR_SLOTS):
            errors[slot] = int(sum(b[b"errors"][ct.c_int(slot)]))
        programs = []
        for fn, tracepoint, raw in self._programs:
            run_count = run_time_s = None
            fd = getattr(b.funcs.get(fn.encode()) or b.funcs.get(fn), "fd", None)
            if fd is not None:
                info = _fdinfo(fd)
                if info.get("run_time_ns", 0) or info.get("run_cnt", 0):
                    run_count, run_time_s = info.get("run_cnt", 0), info.get("run_time_ns", 0) / 1e9
            programs.append(ProgramStats(fn, tracepoint, run_count, run_time_s, raw))
        return MonitorStats(
            concerns=self.concerns, watched=len(self._watched), events_received=self._events_received,
            ringbuf_full=errors[ev.ERR_RINGBUF_FULL],
            map_full={name: errors[slot] for slot, name in _ERROR_NAMES.items()},
            decode_errors=self._decode_errors, programs=tuple(programs))

    # -- lifetime ----------------------------------------------------------------------
    def close(self) -> None:
        """Detach every program and free the maps; safe to call twice."""
        if self._b is not None:
            b, self._b = self._b, None
            b.cleanup()
        self._watched.clear()
        self._flags.clear()

    def __enter__(self) -> "BpfMonitor":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _cgroup_id(value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise InvalidInput(f"cgroup id must be a positive integer (the v2 directory's inode), got {value!r}")
    return value


def _threshold(value: Any) -> int:
    if value is None:
        return 0
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise InvalidInput(f"rss_threshold_bytes must be a positive number of bytes or None, got {value!r}")
    return value


def _sched_bases(pid: int, tid: int) -> tuple[int, int, int, int]:
    """(runtime ns, run_delay ns, pcount, has_base) of a thread as of now, from
    /proc/<pid>/task/<tid>/schedstat: the sched concern charges only what follows."""
    try:
        runtime, delay, pcount = (int(v) for v in PROC.text(f"{pid}/task/{tid}/schedstat").split()[:3])
    except (AgentcgError, ValueError):
        return 0, 0, 0, 0   # taken at its exit instead: nothing of it is charged
    return runtime, delay, pcount, 1


def _fdinfo(fd: int) -> dict[str, int]:
    out: dict[str, int] = {}
    try:
        for name, value in PROC.fdinfo(fd).items():
            if name in ("run_time_ns", "run_cnt"):
                out[name] = int(value)
    except (AgentcgError, ValueError):
        pass
    return out
