"""The reaction benchmark's own kernel-side observer (bench/bench_reaction.py), a separate
process so that its work is not the daemon's.

One small bcc program, filtered per round to the call's cgroup, the daemon's thread and
the worker, sends into a ring buffer:
- USAGE: at each kmem:rss_stat event of the worker (every page fault it takes; in its own
  context) where the memcg page counters changed: the usage of the call's v1 memory cgroup,
  its parent (<sandbox>/tools) and grandparent (the sandbox), read from the kernel's own counters
  (task->cgroups->subsys[memory]->memory.usage, the value cgroup v1 thresholds compare
  with; offsets from the running kernel's BTF, never from headers), with this event's and
  the previous event's bpf_ktime_get_ns. A usage threshold was crossed by a charge between
  the two: the previous event's time is a stamp not later than the crossing (the kernel
  charges in batches of 64 pages, so the bracket is one page fault wide).
- OLD: the first rss_stat event where the worker's anonymous RSS reached a given size (the
  benchmark's earlier, pessimistic stamp: 1 MiB below the calibrated crossing).
- WAKING: sched_waking of the daemon's thread, with the waker's cgroup id: the memcg
  threshold's eventfd_signal wakes the daemon from the allocating task's context, so a
  waking from the call's cgroup is the kernel noticing the crossing (v1 checks thresholds
  every 128 page events per CPU, mm/memcontrol-v1.c).
- OUT/IN: sched_switch of the daemon or the worker (preempted or sleeping; back on a CPU).
- ENTER/EXIT: raw_syscalls of the daemon's thread (epoll_wait returning, the eventfd read,
  the open/write of cgroup.freeze).
All stamps are bpf_ktime_get_ns = CLOCK_MONOTONIC = the daemon's time.monotonic().

Protocol on stdin/stdout: `arm <call cgroup id> <old stamp anon bytes> <daemon tid> <worker
pid>` -> `ok`; `get` -> one JSON line, the round's events (recording stops).
"""
from __future__ import annotations

import ctypes
import json
import re
import subprocess
import sys
from pathlib import Path

USAGE, OLD, WAKING, OUT, IN, ENTER, EXIT = range(1, 8)
SYS_READ, SYS_WRITE, SYS_OPENAT, SYS_CLOSE, SYS_EPOLL_WAIT, SYS_EPOLL_PWAIT = 0, 1, 257, 3, 232, 281  # x86_64
PAGE = 4096
SYSCALL_NAMES = {0: "read", 1: "write", 3: "close", 4: "stat", 5: "fstat", 6: "lstat", 8: "lseek", 16: "ioctl",
                 17: "pread64", 39: "getpid", 186: "gettid", 232: "epoll_wait", 233: "epoll_ctl", 257: "openat",
                 262: "newfstatat", 281: "epoll_pwait", 290: "eventfd2", 332: "statx"}

PROGRAM = r"""
struct ev { u64 ts; u64 prev_ts; u64 a; u64 b; u64 c; u32 kind; u32 pid; };
BPF_RINGBUF_OUTPUT(events, 256);          /* 1 MiB */
BPF_ARRAY(cfg, u64, 5);     /* call cgroup id, old-stamp anon bytes, daemon tid, worker pid, on */
BPF_ARRAY(st, u64, 5);      /* last rss_stat ts, last call usage, last parent usage, old stamp sent,
                               last grandparent usage */

static __always_inline u64 cfg_get(u32 k) { u64 *v = cfg.lookup(&k); return v ? *v : 0; }
static __always_inline u64 *st_at(u32 k) { return st.lookup(&k); }
static __always_inline void emit3(u32 kind, u32 pid, u64 ts, u64 prev, u64 a, u64 b, u64 c) {
    struct ev *e = events.ringbuf_reserve(sizeof(struct ev));
    if (!e)
        return;
    e->ts = ts; e->prev_ts = prev; e->a = a; e->b = b; e->c = c; e->kind = kind; e->pid = pid;
    events.ringbuf_submit(e, 0);
}
static __always_inline void emit(u32 kind, u32 pid, u64 ts, u64 prev, u64 a, u64 b) {
    struct ev *e = events.ringbuf_reserve(sizeof(struct ev));
    if (!e)
        return;
    e->ts = ts; e->prev_ts = prev; e->a = a; e->b = b; e->c = 0; e->kind = kind; e->pid = pid;
    events.ringbuf_submit(e, 0);
}

TRACEPOINT_PROBE(kmem, rss_stat) {
    if (!cfg_get(4) || !args->curr || cfg_get(0) != bpf_get_current_cgroup_id())
        return 0;
    u64 now = bpf_ktime_get_ns();
    u64 *last = st_at(0), *lcall = st_at(1), *lpar = st_at(2), *sent = st_at(3), *lgp = st_at(4);
    if (!last || !lcall || !lpar || !sent || !lgp)
        return 0;
    void *task = (void *)bpf_get_current_task(), *cset = 0, *css = 0, *parent = 0, *gparent = 0;
    long usage = 0, pusage = 0, gpusage = 0;
    bpf_probe_read_kernel(&cset, sizeof(cset), task + OFF_TASK_CGROUPS);
    if (cset)
        bpf_probe_read_kernel(&css, sizeof(css), cset + OFF_CSS_SET_SUBSYS + 8 * MEMORY_CGRP_ID);
    if (css) {
        void *memcg = css - OFF_MEMCG_CSS;
        bpf_probe_read_kernel(&usage, sizeof(usage), memcg + OFF_MEMCG_MEMORY + OFF_PC_USAGE);
        bpf_probe_read_kernel(&parent, sizeof(parent), memcg + OFF_MEMCG_MEMORY + OFF_PC_PARENT);
    }
    if (parent) {
        bpf_probe_read_kernel(&pusage, sizeof(pusage), parent + OFF_PC_USAGE);
        bpf_probe_read_kernel(&gparent, sizeof(gparent), parent + OFF_PC_PARENT);
    }
    if (gparent)
        bpf_probe_read_kernel(&gpusage, sizeof(gpusage), gparent + OFF_PC_USAGE);
    u32 pid = bpf_get_current_pid_tgid();
    if ((u64)usage != *lcall || (u64)pusage != *lpar || (u64)gpusage != *lgp || *last == 0)
        emit3(USAGE, pid, now, *last, usage, pusage, gpusage);
    *last = now; *lcall = usage; *lpar = pusage; *lgp = gpusage;
    if (!*sent && args->member == ANON_MEMBER && args->size >= (long)cfg_get(1)) {
        *sent = 1;
        emit(OLD, pid, now, 0, args->size, 0);
    }
    return 0;
}

TRACEPOINT_PROBE(sched, sched_waking) {
    if (cfg_get(4) && args->pid == cfg_get(2))
        emit(WAKING, bpf_get_current_pid_tgid(), bpf_ktime_get_ns(), 0, bpf_get_current_cgroup_id(), 0);
    return 0;
}

TRACEPOINT_PROBE(sched, sched_switch) {
    if (!cfg_get(4))
        return 0;
    u64 d = cfg_get(2), w = cfg_get(3), now = bpf_ktime_get_ns();
    if (args->prev_pid == d || args->prev_pid == w)
        emit(OUT, args->prev_pid, now, 0, args->prev_state, 0);
    if (args->next_pid == d || args->next_pid == w)
        emit(IN, args->next_pid, now, 0, 0, 0);
    return 0;
}

TRACEPOINT_PROBE(raw_syscalls, sys_enter) {
    u32 tid = bpf_get_current_pid_tgid();
    if (cfg_get(4) && tid == cfg_get(2))
        emit(ENTER, tid, bpf_ktime_get_ns(), 0, args->id, 0);
    return 0;
}

TRACEPOINT_PROBE(raw_syscalls, sys_exit) {
    u32 tid = bpf_get_current_pid_tgid();
    if (cfg_get(4) && tid == cfg_get(2))
        emit(EXIT, tid, bpf_ktime_get_ns(), 0, args->id, args->ret);
    return 0;
}
"""
RSS_STAT_FORMATS = (Path("/sys/kernel/tracing/events/kmem/rss_stat/format"),
                    Path("/sys/kernel/debug/tracing/events/kmem/rss_stat/format"))


def memory_subsys_id(proc_cgroups: Path = Path("/proc/cgroups")) -> int:
    """The memory controller's cgroup_subsys_id: /proc/cgroups lists subsystems in id order."""
    names = [line.split()[0] for line in proc_cgroups.read_text().splitlines() if line and not line.startswith("#")]
    if "memory" not in names:
        raise RuntimeError("/proc/cgroups lists no memory controller")
    return names.index("memory")


def defines() -> dict[str, int]:
    from agentcg.bpf.btf import VMLINUX_BTF, Btf
    btf = Btf(VMLINUX_BTF.read_bytes(), str(VMLINUX_BTF))
    fmt = next((p.read_text() for p in RSS_STAT_FORMATS if p.exists()), "")
    member = re.search(r'\{\s*(\d+),\s*"MM_ANONPAGES"\s*\}', fmt)
    if member is None:
        raise RuntimeError("kmem:rss_stat has no MM_ANONPAGES member here")
    out = {"OFF_TASK_CGROUPS": btf.offset("task_struct", "cgroups"), "OFF_CSS_SET_SUBSYS": btf.offset("css_set", "subsys"),
           "OFF_MEMCG_CSS": btf.offset("mem_cgroup", "css"), "OFF_MEMCG_MEMORY": btf.offset("mem_cgroup", "memory"),
           "OFF_PC_USAGE": btf.offset("page_counter", "usage"), "OFF_PC_PARENT": btf.offset("page_counter", "parent"),
           "MEMORY_CGRP_ID": memory_subsys_id(), "ANON_MEMBER": int(member.group(1))}
    out.update(USAGE=USAGE, OLD=OLD, WAKING=WAKING, OUT=OUT, IN=IN, ENTER=ENTER, EXIT=EXIT)
    return out


class _Ev(ctypes.Structure):
    _fields_ = [("ts", ctypes.c_uint64), ("prev_ts", ctypes.c_uint64), ("a", ctypes.c_uint64),
                ("b", ctypes.c_uint64), ("c", ctypes.c_uint64), ("kind", ctypes.c_uint32), ("pid", ctypes.c_uint32)]


def observer_main() -> int:
    import bcc
    b = bcc.BPF(text=PROGRAM, cflags=[f"-D{k}={v}" for k, v in defines().items()])
    cfg, st = b["cfg"], b["st"]
    got: list[list[int]] = []

    def on_event(_ctx: object, data: int, _size: int) -> None:
        e = ctypes.cast(data, ctypes.POINTER(_Ev)).contents
        if len(got) < 200_000:
            got.append([e.kind, e.ts, e.prev_ts, e.a, e.b, e.pid, e.c])

    b["events"].open_ring_buffer(on_event)
    print("ready", flush=True)
    for line in sys.stdin:
        words = line.split()
        if words[:1] == ["arm"]:
            cfg[ctypes.c_int(4)] = ctypes.c_ulonglong(0)
            b.ring_buffer_consume()
            got.clear()
            for k in range(5):
                st[ctypes.c_int(k)] = ctypes.c_ulonglong(0)
            for k, value in enumerate(words[1:5]):
                cfg[ctypes.c_int(k)] = ctypes.c_ulonglong(int(value))
            cfg[ctypes.c_int(4)] = ctypes.c_ulonglong(1)
            print("ok", flush=True)
        elif words[:1] == ["get"]:
            cfg[ctypes.c_int(4)] = ctypes.c_ulonglong(0)
            b.ring_buffer_consume()
            print(json.dumps(got), flush=True)
            got.clear()
    return 0


class Observer:
    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, __file__], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True)
        line = self.proc.stdout.readline().strip()
        if line != "ready":
            raise RuntimeError(f"the kernel-side observer did not start: {line or 'it exited'}")

    def _ask(self, line: str) -> str:
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        return self.proc.stdout.readline().strip()

    def arm(self, cgroup_id: int, old_anon_bytes: int, daemon_tid: int, worker_pid: int) -> None:
        assert self._ask(f"arm {cgroup_id} {old_anon_bytes} {daemon_tid} {worker_pid}") == "ok"

    def events(self) -> list[list[int]]:
        return json.loads(self._ask("get"))

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(10)
        self.proc.stdout.close()



# ---- one round's breakdown --------------------------------------------------------------
SEGMENTS = (("notice", "crossing -> kernel wakes the daemon (from the call's context)"),
            ("on_cpu", "woken -> the daemon on a CPU"),
            ("epoll", "on a CPU -> epoll_wait returns"),
            ("read", "epoll_wait returns -> the eventfd read"),
            ("decide", "the eventfd read -> the freeze write starts (open of cgroup.freeze)"),
            ("write", "the freeze write (open, write, close)"))


def crossing_bracket(events: list[list[int]], thresholds: list[tuple[str, int]]) -> tuple[float, float, str] | None:
    """(lo, hi, which) in seconds: the earliest of `thresholds` ((scope, bytes): "call" on
    the call's memcg, "sandbox" on its grandparent, the sandbox: <sandbox>/tools/<call>)
    crossed between two rss_stat samples: `lo` is the last sample below it (not later than
    the crossing), `hi` the first at or above."""
    best = None
    samples = sorted((e for e in events if e[0] == USAGE), key=lambda e: e[1])
    for scope, limit in thresholds:
        for e in samples:
            ts, prev = e[1], e[2]
            if (e[3] if scope == "call" else e[6]) * PAGE >= limit:
                if not prev:
                    return None          # across before the round began: no stamp for this round
                if best is None or prev < best[0] * 1e9:
                    best = (prev / 1e9, ts / 1e9, scope)
                break
    return best


def first_usage(events: list[list[int]]) -> tuple[int, int] | None:
    """(call, sandbox) memcg usage in bytes at the first sample: checks the BTF walk."""
    samples = sorted((e for e in events if e[0] == USAGE), key=lambda e: e[1])
    return (samples[0][3] * PAGE, samples[0][6] * PAGE) if samples else None


def _off_cpu(events: list[list[int]], pid: int, start: float, end: float, preempted: bool = True) -> float:
    """Seconds `pid` spent preempted (switched out while runnable), or else asleep (blocked
    on a lock, waiting for I/O), inside [start, end]."""
    total, out = 0.0, None
    for kind, ts, _, state, _, who, *_ in events:
        t = ts / 1e9
        if who != pid or kind not in (OUT, IN):
            continue
        if kind == OUT and (state == 0) == preempted:
            out = t
        elif kind == IN and out is not None:
            total += max(0.0, min(t, end) - max(out, start)) if t > start and out < end else 0.0
            out = None
    if out is not None and out < end:
        total += end - max(out, start)
    return total


def breakdown(events: list[list[int]], crossed_s: float, read_s: float | None, applied_s: float,
              call_cgroup_id: int, daemon_tid: int, worker_pid: int) -> dict:
    """Where one reaction's time went (seconds per SEGMENTS key, None where no stamp)."""
    events = sorted(events, key=lambda e: e[1])
    t = lambda e: e[1] / 1e9                                   # noqa: E731
    # the last wake-up from the call's own context before the daemon acted: with the eventfd
    # armed early (reaction.py EARLY_BYTES) it may come before the crossing (then 0 here)
    end = read_s if read_s is not None else applied_s
    wakes = [t(e) for e in events if e[0] == WAKING and e[3] == call_cgroup_id and t(e) <= end]
    wake = wakes[-1] if wakes else None
    since = wake if wake is not None else crossed_s
    on_cpu = next((t(e) for e in events if e[0] == IN and e[5] == daemon_tid and t(e) >= since), None) \
        if wake is not None else None
    epoll = next((t(e) for e in events if e[0] == EXIT and e[3] in (SYS_EPOLL_WAIT, SYS_EPOLL_PWAIT)
                  and since <= t(e) <= applied_s), None)
    opens = [t(e) for e in events if e[0] == ENTER and e[3] == SYS_OPENAT and t(e) <= applied_s]
    write_start = opens[-1] if opens else None
    after_read = read_s if read_s is not None else epoll
    between = [e[3] for e in events if e[0] == ENTER and after_read is not None and write_start is not None
               and after_read <= t(e) < write_start]
    syscalls = len(between)
    def gap(a: float | None, b: float | None) -> float | None:     # time in [crossing, b] after a
        if a is None or b is None or b < a:
            return None
        return max(0.0, b - max(a, crossed_s))
    return {"notice": gap(crossed_s, wake), "on_cpu": gap(wake, on_cpu), "epoll": gap(on_cpu or wake, epoll),
            "read": gap(epoll, read_s), "decide": gap(after_read, write_start), "write": gap(write_start, applied_s),
            "woken": wake is not None, "syscalls_before_write": syscalls, "syscall_ids": between,
            "daemon_preempted": _off_cpu(events, daemon_tid, since, applied_s),
            "daemon_blocked": _off_cpu(events, daemon_tid, epoll or since, applied_s, preempted=False),
            "worker_preempted": _off_cpu(events, worker_pid, crossed_s, max(crossed_s, wake) if wake is not None
                                         else applied_s)}



def syscall_mix(ids: list[int]) -> str:
    """'openat 10, read 20, ...' for one window's syscalls."""
    counts: dict[str, int] = {}
    for i in ids:
        name = SYSCALL_NAMES.get(i, str(i))
        counts[name] = counts.get(name, 0) + 1
    return ", ".join(f"{name} {n}" for name, n in sorted(counts.items(), key=lambda kv: -kv[1])) or "none"


if __name__ == "__main__":
    sys.exit(observer_main())
