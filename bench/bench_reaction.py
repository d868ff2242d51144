"""Benchmark (2): reaction time from an RSS threshold crossing in the kernel to user space
having acted on it (written cgroup.freeze of that cgroup).

A worker in a scratch v2 cgroup allocates 64 MiB past a threshold set 32 MiB above its
idle RSS; the kernel sends an RssThresholdEvent stamped with bpf_ktime_get_ns(); this
process polls the ring buffer, writes "1" to cgroup.freeze and takes CLOCK_MONOTONIC.
Reaction = that time minus the kernel's stamp. Then it thaws, the worker frees (RSS falls
below, the threshold re-arms) and the next round starts.
Baseline: both cores idle. Result: both cores busy with two busy-loop processes.
Target: p99 at most 5 ms with both cores busy.

    sudo .venv/bin/python bench/bench_reaction.py [--rounds 200]
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_bpf_overhead import scratch_cgroup  # noqa: E402

from agentcg.bpf.events import RssThresholdEvent  # noqa: E402
from agentcg.bpf.monitor import BpfMonitor, cgroup_id_of  # noqa: E402

TARGET_P99_S = 0.005
MiB = 2**20
WORKER = """
import sys
held = None
for line in sys.stdin:
    if line.startswith("a"):
        held = bytearray(64 * 2**20)
    else:
        held = None
    sys.stdout.write("ok\\n"); sys.stdout.flush()
"""


def command(worker: subprocess.Popen, text: str) -> None:
    worker.stdin.write(text + "\n")
    worker.stdin.flush()


def measure(mon: BpfMonitor, cgroup: Path, worker: subprocess.Popen, rounds: int) -> tuple[list[float], int]:
    cgroup_id = cgroup_id_of(cgroup)
    freeze = os.open(cgroup / "cgroup.freeze", os.O_WRONLY)
    latencies: list[float] = []
    missed = 0
    try:
        for _ in range(rounds):
            command(worker, "a")
            event = None
            deadline = time.monotonic() + 2.0
            while event is None and time.monotonic() < deadline:
                for e in mon.poll(0.5):
                    if isinstance(e, RssThresholdEvent) and e.cgroup_id == cgroup_id:
                        os.pwrite(freeze, b"1", 0)
                        acted_s = time.monotonic()
                        latencies.append(acted_s - e.monotonic_s)
                        event = e
                        break
            if event is None:
                missed += 1
            os.pwrite(freeze, b"0", 0)
            worker.stdout.readline()
            command(worker, "f")
            worker.stdout.readline()
            mon.poll(0)
    finally:
        os.pwrite(freeze, b"0", 0)
        os.close(freeze)
    return latencies, missed


def normal_priority() -> None:
    os.setpriority(os.PRIO_PROCESS, 0, 0)


def summary(latencies: list[float]) -> str:
    q = statistics.quantiles(latencies, n=100, method="inclusive")
    return (f"p50 {q[49] * 1e3:6.3f} ms  p99 {q[98] * 1e3:6.3f} ms  max {max(latencies) * 1e3:6.3f} ms"
            f"  (n={len(latencies)})")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--nice", type=int, default=0,
                        help="niceness of this (reacting) process, as the daemon's unit file would set it")
    parser.add_argument("--fifo", action="store_true",
                        help="run the reacting process as SCHED_FIFO 1 (children reset to normal)")
    args = parser.parse_args()
    if args.nice:
        os.setpriority(os.PRIO_PROCESS, 0, args.nice)
    if args.fifo:
        os.sched_setscheduler(0, os.SCHED_FIFO | os.SCHED_RESET_ON_FORK, os.sched_param(1))
    with scratch_cgroup() as cgroup, BpfMonitor() as mon:
        def enter() -> None:
            os.setpriority(os.PRIO_PROCESS, 0, 0)  # only the reacting process runs at --nice
            (cgroup / "cgroup.procs").write_text("0")

        worker = subprocess.Popen([sys.executable, "-c", WORKER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  text=True, preexec_fn=enter)
        try:
            mon.watch(cgroup_id_of(cgroup))
            command(worker, "f")
            worker.stdout.readline()
            time.sleep(0.1)
            idle_rss = mon.counters(cgroup_id_of(cgroup)).rss_bytes
            mon.set_rss_threshold(cgroup_id_of(cgroup), idle_rss + 32 * MiB)
            baseline, missed_idle = measure(mon, cgroup, worker, args.rounds)
            busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"], preexec_fn=normal_priority)
                    for _ in range(2)]
            try:
                time.sleep(0.2)
                result, missed_busy = measure(mon, cgroup, worker, args.rounds)
            finally:
                for p in busy:
                    p.kill()
                    p.wait()
        finally:
            worker.kill()
            worker.wait()
        stats = mon.stats()
    p99_base = statistics.quantiles(baseline, n=100, method="inclusive")[98]
    p99_busy = statistics.quantiles(result, n=100, method="inclusive")[98]
    print(f"Reaction time, RSS threshold crossing -> cgroup.freeze written, {os.cpu_count()} CPUs, "
          f"reacting process {'SCHED_FIFO 1' if args.fifo else 'SCHED_OTHER'}, nice {os.getpriority(os.PRIO_PROCESS, 0)}")
    print(f"  baseline (cores idle):            {summary(baseline)}  missed {missed_idle}")
    print(f"  result (2 busy-loop processes):   {summary(result)}  missed {missed_busy}")
    print(f"  ratio p99 busy/idle: {p99_busy / p99_base:.2f}   ring buffer full: {stats.ringbuf_full}")
    print(f"  target p99 <= {TARGET_P99_S * 1e3:.0f} ms with cores busy: "
          f"{'met' if p99_busy <= TARGET_P99_S and not missed_busy else 'NOT met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
