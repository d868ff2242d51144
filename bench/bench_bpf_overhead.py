"""Benchmark (3): wall-time overhead of the loaded BPF programs, with against without.

Two workloads run in a scratch v2 cgroup that the monitor watches:
  fork/exec: a shell runs 2,000 short commands (/bin/true), one after another;
  allocation: a Python process allocates and frees 64 MiB twenty times (touching pages).
Rounds alternate without/with (ABBA) so drift hits both sides; "with" means every concern
loaded, the cgroup watched, and a thread draining the ring buffer as the daemon would.
Prints the baseline, the result and their ratio (target: at most 1.03) per workload.

    sudo .venv/bin/python bench/bench_bpf_overhead.py [--rounds 5]
"""
from __future__ import annotations

import argparse
import contextlib
import os
import resource
import secrets
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Iterator

from agentcg.bpf.monitor import BpfMonitor, cgroup_id_of

TARGET_RATIO = 1.03
WORKLOADS = {
    "fork/exec 2000 commands": ["/bin/sh", "-c", "i=0; while [ $i -lt 2000 ]; do /bin/true; i=$((i+1)); done"],
    "allocation 20 x 64 MiB": [sys.executable, "-c",
                               "for _ in range(20):\n    b = bytearray(64 * 2**20)\n    del b"],
}


def v2_root() -> Path:
    for candidate in (Path("/sys/fs/cgroup/unified"), Path("/sys/fs/cgroup")):
        if (candidate / "cgroup.subtree_control").exists():
            return candidate
    raise SystemExit("bench: no cgroup v2 tree found")


@contextlib.contextmanager
def scratch_cgroup() -> Iterator[Path]:
    """A v2 cgroup `agentcg-bench-<random>`, killed and removed on the way out."""
    path = v2_root() / f"agentcg-bench-{secrets.token_hex(4)}"
    path.mkdir()
    try:
        yield path
    finally:
        (path / "cgroup.kill").write_text("1")
        deadline = time.monotonic() + 10
        while "populated 1" in (path / "cgroup.events").read_text() and time.monotonic() < deadline:
            time.sleep(0.01)
        os.rmdir(path)


def run_in(cgroup: Path, argv: list[str]) -> float:
    return run_timed(cgroup, argv)[0]


def run_timed(cgroup: Path, argv: list[str]) -> tuple[float, float]:
    """(wall seconds, CPU seconds of the workload's processes) for one run in `cgroup`."""
    def enter() -> None:
        (cgroup / "cgroup.procs").write_text("0")

    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run(argv, preexec_fn=enter, check=True)
    wall_s = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall_s, (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)


@contextlib.contextmanager
def loaded(cgroup: Path) -> Iterator[BpfMonitor]:
    with BpfMonitor() as mon:
        mon.watch(cgroup_id_of(cgroup))
        stop = threading.Event()

        def drain() -> None:
            while not stop.is_set():
                mon.poll(0.05)

        thread = threading.Thread(target=drain, name="bpf-drain")
        thread.start()
        try:
            yield mon
        finally:
            stop.set()
            thread.join()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    times: dict[tuple[str, bool], list[float]] = {(w, m): [] for w in WORKLOADS for m in (False, True)}
    cpu: dict[tuple[str, bool], list[float]] = {(w, m): [] for w in WORKLOADS for m in (False, True)}
    lost = 0
    with scratch_cgroup() as cgroup:
        for argv in WORKLOADS.values():
            run_in(cgroup, argv)  # warm the page cache and the binaries once
        for round_ in range(args.rounds):
            for with_programs in ((False, True) if round_ % 2 == 0 else (True, False)):
                if with_programs:
                    with loaded(cgroup) as mon:
                        for name, argv in WORKLOADS.items():
                            wall_s, cpu_s = run_timed(cgroup, argv)
                            times[(name, True)].append(wall_s)
                            cpu[(name, True)].append(cpu_s)
                        stats = mon.stats()
                        lost += stats.ringbuf_full + sum(stats.map_full.values())
                else:
                    for name, argv in WORKLOADS.items():
                        wall_s, cpu_s = run_timed(cgroup, argv)
                        times[(name, False)].append(wall_s)
                        cpu[(name, False)].append(cpu_s)
    print(f"BPF program overhead, {args.rounds} rounds each, ABBA order, {os.cpu_count()} CPUs")
    worst = 0.0
    for name in WORKLOADS:
        base, result = times[(name, False)], times[(name, True)]
        ratio = statistics.median(result) / statistics.median(base)
        worst = max(worst, ratio)
        print(f"  {name:26s} baseline median {statistics.median(base):7.3f} s (min {min(base):.3f})"
              f"  with programs median {statistics.median(result):7.3f} s (min {min(result):.3f})"
              f"  ratio {ratio:.3f} (min/min {min(result) / min(base):.3f})")
        cpu_base, cpu_result = statistics.median(cpu[(name, False)]), statistics.median(cpu[(name, True)])
        print(f"  {'':26s} workload CPU median {cpu_base:7.3f} s -> {cpu_result:7.3f} s"
              f"  ratio {cpu_result / cpu_base:.3f}")
    print(f"  events lost (ring buffer full, maps full): {lost}")
    print(f"  target ratio <= {TARGET_RATIO}: {'met' if worst <= TARGET_RATIO else 'NOT met'} (worst {worst:.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
