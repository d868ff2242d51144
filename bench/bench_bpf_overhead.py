"""Benchmark (3): what the loaded BPF programs cost the work around them.

Three workloads, each run in a scratch v2 cgroup the monitor watches and in one it does not:
  fork/exec: a shell runs short commands (/bin/true), one after another;
  allocation: a Python process allocates and frees 64 MiB several times (touching pages);
  ping-pong: two processes on one CPU bounce a byte over two pipes (a switch each way).
Three configurations, rotated within each round so drift hits all alike: none (no programs),
default (agentcg's default concerns) and faults (default plus the opt-in per-fault concern).
With programs loaded, a separate process holds them and drains the ring buffer, as the
daemon does.
BPF run-time stats are off while timing (they cost every program run); one extra pass with
BPF_ENABLE_STATS counts hits and ns per hit of each program.
Target: default concerns at most 3 % over none, wall and CPU, on every workload, watched
and unwatched ("NOT met" and exit status 1 otherwise).

    sudo .venv/bin/python bench/bench_bpf_overhead.py [--rounds 5] [--scale 1.0]
"""
from __future__ import annotations

import argparse
import contextlib
import json
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

from agentcg.bpf.monitor import CONCERNS, BpfMonitor, cgroup_id_of
from agentcg.controller.daemon.bpfstats import disable_bpf_stats, enable_bpf_stats

TARGET_RATIO = 1.03
SETTLE_S = 0.5      # after loading: the compiler's memory is freed, caches settle
CONFIGS = {"none": None, "default": CONCERNS, "faults": CONCERNS + ("faults",)}
_PINGPONG = """
import os, sys
n = int(sys.argv[1])
os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})  # one CPU: every trip is two switches
a_r, a_w = os.pipe(); b_r, b_w = os.pipe()
if os.fork() == 0:
    for _ in range(n):
        os.read(a_r, 1); os.write(b_w, b"x")
    os._exit(0)
for _ in range(n):
    os.write(a_w, b"x"); os.read(b_r, 1)
os.wait()
"""


def workloads(scale: float) -> dict[str, list[str]]:
    execs, allocs, trips = int(1000 * scale), max(1, int(10 * scale)), int(20000 * scale)
    return {
        f"fork/exec {execs} commands": ["/bin/sh", "-c", f"i=0; while [ $i -lt {execs} ]; do /bin/true; i=$((i+1)); done"],
        f"allocation {allocs} x 64 MiB": [sys.executable, "-c",
                                          f"for _ in range({allocs}):\n    b = bytearray(64 * 2**20)\n    del b"],
        f"ping-pong {trips} round trips": [sys.executable, "-c", _PINGPONG, str(trips)],
    }


def v2_root() -> Path:
    for candidate in (Path("/sys/fs/cgroup/unified"), Path("/sys/fs/cgroup")):
        if (candidate / "cgroup.subtree_control").exists():
            return candidate
    raise SystemExit("bench: no cgroup v2 tree found")


@contextlib.contextmanager
def scratch_cgroups(n: int) -> Iterator[list[Path]]:
    """v2 cgroups `agentcg-bench-<random>`, killed and removed on the way out."""
    made: list[Path] = []
    try:
        for _ in range(n):
            made.append(v2_root() / f"agentcg-bench-{secrets.token_hex(4)}")
            made[-1].mkdir()
        yield made
    finally:
        for path in made:
            if not path.exists():
                continue
            (path / "cgroup.kill").write_text("1")
            deadline = time.monotonic() + 10
            while "populated 1" in (path / "cgroup.events").read_text() and time.monotonic() < deadline:
                time.sleep(0.01)
            os.rmdir(path)


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


class MonitorProcess:
    """The programs loaded and drained by a separate process, as the daemon would: the
    process that spawns the workloads stays small (a fork of a process holding bcc and
    LLVM copies ~150 MiB of page tables, which is the spawner's cost, not the programs')."""

    def __init__(self, concerns: tuple[str, ...], watched: Path) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--serve-monitor", ",".join(concerns), str(cgroup_id_of(watched))],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        if self.proc.stdout.readline().strip() != "ready":
            self.proc.kill()
            raise SystemExit("bench: the monitor process did not start (see its error above)")
        time.sleep(SETTLE_S)

    def finish(self) -> dict:
        """Stop it; its stats: {"lost": n, "programs": [[tracepoint, hits, seconds], ...]}."""
        out, _ = self.proc.communicate(timeout=60)
        return json.loads(out.strip().splitlines()[-1])


def serve_monitor(concerns: str, cgroup_id: int) -> int:
    """--serve-monitor: load, watch, drain until stdin closes, print stats as JSON."""
    with BpfMonitor(concerns=tuple(concerns.split(","))) as mon:
        mon.watch(cgroup_id)
        stop = threading.Event()

        def drain() -> None:
            while not stop.is_set():
                mon.poll(0.1)

        thread = threading.Thread(target=drain, name="bpf-drain")
        thread.start()
        print("ready", flush=True)
        sys.stdin.read()
        stop.set()
        thread.join()
        stats = mon.stats()
        print(json.dumps({"lost": stats.ringbuf_full + sum(stats.map_full.values()),
                          "programs": [[p.tracepoint, p.run_count, p.run_time_s] for p in stats.programs]}))
    return 0


@contextlib.contextmanager
def loaded(concerns: tuple[str, ...] | None, watched: Path) -> Iterator[dict]:
    """Programs loaded while the block runs; the dict gets their stats afterwards."""
    result: dict = {"lost": 0, "programs": []}
    if concerns is None:
        yield result
        return
    mon = MonitorProcess(concerns, watched)
    try:
        yield result
    finally:
        result.update(mon.finish())


def program_stats(config: str, work: dict[str, list[str]], cgroups: dict[str, Path],
                  base_cpu: dict[tuple[str, str], float] | None = None) -> list[str]:
    """One pass with run-time stats on: hits and ns per hit of each program, per workload;
    with base_cpu ((where, workload) -> CPU seconds without programs), the programs' own
    run time as a share of it (a load-robust lower bound of their cost: dispatch excluded)."""
    lines = []
    fd = enable_bpf_stats()
    if fd is None:
        return [f"  {config}: BPF_ENABLE_STATS refused by this kernel: hits and ns per hit not measured"]
    try:
        for where, cgroup in cgroups.items():
            for name, argv in work.items():
                with loaded(CONFIGS[config], cgroups["watched"]) as result:
                    run_timed(cgroup, argv)
                busy = [(tp, n, t) for tp, n, t in result["programs"] if n]
                cells = ", ".join(f"{tp.split(':')[1]} {n} x {t / n * 1e9:.0f} ns"
                                  for tp, n, t in sorted(busy, key=lambda p: -p[2]))
                total_ms = sum(t for _tp, _n, t in busy) * 1e3
                share = ""
                if base_cpu and base_cpu.get((where, name)):
                    share = f" ({total_ms / 1e3 / base_cpu[(where, name)] * 100:.1f} % of its CPU)"
                lines.append(f"  {config:7s} {where:9s} {name:30s} {total_ms:7.1f} ms in programs{share}: "
                             f"{cells or 'no hits'}")
    finally:
        disable_bpf_stats(fd)
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--scale", type=float, default=1.0, help="workload size factor (1.0: about 2 min in all)")
    parser.add_argument("--serve-monitor", nargs=2, metavar=("CONCERNS", "CGROUP_ID"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_monitor:
        return serve_monitor(args.serve_monitor[0], int(args.serve_monitor[1]))
    if args.rounds < 1 or not 0 < args.scale <= 10:
        print("bench: --rounds must be >= 1 and --scale in (0, 10]", file=sys.stderr)
        return 2
    work = workloads(args.scale)
    keys = [(c, w, n) for c in CONFIGS for w in ("watched", "unwatched") for n in work]
    wall: dict[tuple[str, str, str], list[float]] = {k: [] for k in keys}
    cpu: dict[tuple[str, str, str], list[float]] = {k: [] for k in keys}
    lost = 0
    started = time.monotonic()
    with scratch_cgroups(2) as (watched, unwatched):
        cgroups = {"watched": watched, "unwatched": unwatched}
        for argv in work.values():
            run_timed(watched, argv)  # warm the page cache and the binaries once
        order = list(CONFIGS)
        for round_ in range(args.rounds):
            for config in order[round_ % 3:] + order[:round_ % 3]:
                with loaded(CONFIGS[config], watched) as result:
                    for where, cgroup in cgroups.items():
                        for name, argv in work.items():
                            wall_s, cpu_s = run_timed(cgroup, argv)
                            wall[(config, where, name)].append(wall_s)
                            cpu[(config, where, name)].append(cpu_s)
                lost += result["lost"]
        base_cpu = {(w, n): statistics.median(cpu[("none", w, n)]) for w in cgroups for n in work}
        stats_lines = (program_stats("default", work, cgroups, base_cpu)
                       + program_stats("faults", work, cgroups, base_cpu))
    print(f"BPF program overhead, {args.rounds} rounds, configurations rotated per round, "
          f"{os.cpu_count()} CPUs, {time.monotonic() - started:.0f} s")
    print("  ratio = median over rounds of (configuration / none in the same round); medians in seconds")
    missed = []
    for where in ("watched", "unwatched"):
        for name in work:
            base_w, base_c = wall[("none", where, name)], cpu[("none", where, name)]
            print(f"  {where:9s} {name:30s} none: wall {statistics.median(base_w):6.3f} cpu {statistics.median(base_c):6.3f}")
            for config in ("default", "faults"):
                w, c = wall[(config, where, name)], cpu[(config, where, name)]
                rw = statistics.median(a / b for a, b in zip(w, base_w))
                rc = statistics.median(a / b for a, b in zip(c, base_c))
                verdict = ""
                if config == "default":
                    ok = rw <= TARGET_RATIO and rc <= TARGET_RATIO
                    verdict = "met" if ok else "NOT met"
                    if not ok:
                        missed.append(f"{where} {name}")
                print(f"  {'':9s} {'':30s} {config:7s} wall {statistics.median(w):6.3f} x{rw:.3f}"
                      f"  cpu {statistics.median(c):6.3f} x{rc:.3f}  {verdict}")
    print("  per program (one pass, BPF_ENABLE_STATS on): hits x ns per hit")
    for line in stats_lines:
        print(line)
    print(f"  events lost (ring buffer full, maps full): {lost}")
    print(f"  target: default concerns <= {TARGET_RATIO:.2f}x wall and CPU on every workload: "
          + ("met" if not missed else f"NOT met ({'; '.join(missed)})"))
    return 0 if not missed else 1


if __name__ == "__main__":
    sys.exit(main())
