"""Benchmark: the daemon at scale (issue 13, "Daemon scale").

A real daemon (controller/daemon/testing.py: its own socket, state dir and cgroup root,
eBPF off so the figures are the daemon's own; the eBPF cost is bench_bpf_overhead's) is
driven through its socket by this process, one selector loop speaking the protocol on
many connections (so the load generator, not the daemon, is the lighter side):

1. `toolcall.begin` latency (p50, p99 of `--samples` begins per pass, each ended
   afterwards) with 10, 200 and 1,600 calls running. Target: the 1,600 p50 within 2x of
   the 10 p50 (the baseline, same run). Running calls are empty call cgroups owned by a
   live connection. The levels are measured going up (10, 200, 1,600) and again coming
   down (1,600 calls ended to 200, then to 10), `--rounds` times (2), and each level's
   figures are over all its passes: a host whose load drifts during the run (or a daemon
   still warming up at the first level) then weighs on every level alike instead of on one.
2. Daemon CPU while idle with 1,000 tracked calls, over `--idle-s`, from the daemon's
   utime+stime in /proc (percent of one CPU). Baseline: the same with no calls. Target < 2 %.
3. Throughput: `--clients` connections (100), each one begin + end after another, for
   `--load-s`; calls/s over all. Target >= 500 calls/s. Printed with it: the daemon's CPU
   per begin+end over that load, all its threads and its loop's thread alone (from /proc).

    sudo .venv/bin/python bench/bench_daemon_scale.py [--samples 60] [--rounds 2] [--idle-s 10] [--load-s 10]

Prints each figure with its target and "met" / "NOT met"; exits 1 on a miss.
"""
from __future__ import annotations

import argparse
import json
import os
import selectors
import socket
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agentcg.controller.daemon.testing import DaemonProcess  # noqa: E402

LEVELS = (10, 200, 1600)
IDLE_CALLS = 1000
TARGET_BEGIN_RATIO = 2.0
TARGET_IDLE_CPU = 0.02
TARGET_CALLS_PER_S = 500.0
CLK_TCK = os.sysconf("SC_CLK_TCK")


class Conn:
    """One blocking connection (for the setup and the latency samples)."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(str(path))
        self.file = self.sock.makefile("rb")
        self.ids = 0

    def request(self, op: str, **args: object) -> dict:
        self.ids += 1
        self.sock.sendall(json.dumps({"v": 1, "id": self.ids, "op": op, "args": args}).encode() + b"\n")
        response = json.loads(self.file.readline())
        if not response.get("ok"):
            raise SystemExit(f"{op} failed: {response}")
        return response["result"]

    def close(self) -> None:
        self.file.close()
        self.sock.close()


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def thread_cpu_s(pid: int, tid: int) -> float:
    fields = Path(f"/proc/{pid}/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def idle_cpu(pid: int, seconds: float) -> float:
    start_cpu, start = cpu_s(pid), time.monotonic()
    time.sleep(seconds)
    return (cpu_s(pid) - start_cpu) / (time.monotonic() - start)


def on_cpu_s(pid: int) -> float:
    """The process's time on a CPU so far, from the scheduler (ns resolution, all threads)."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            total += int((task / "schedstat").read_text().split()[0])
        except (FileNotFoundError, ProcessLookupError):
            pass
    return total / 1e9


def begin_times(conn: Conn, samples: int, pid: int, cpu: list[float]) -> list[float]:
    """`samples` begins timed (then ended); the daemon's CPU time per begin + end goes to `cpu`."""
    times, began = [], []
    cpu0 = on_cpu_s(pid)
    for _ in range(samples):
        t0 = time.perf_counter()
        began.append(conn.request("toolcall.begin", sandbox="S", tool="bench")["call_id"])
        times.append(time.perf_counter() - t0)
    for call_id in began:
        conn.request("toolcall.end", call_id=call_id, exit_code=0)
    cpu.append((on_cpu_s(pid) - cpu0) / samples)
    return times


def percentiles(times: list[float]) -> tuple[float, float]:
    times = sorted(times)
    return statistics.median(times), times[min(len(times) - 1, int(len(times) * 0.99))]


def end_all(conn: Conn, call_ids: list[str], window: int = 64) -> None:
    """toolcall.end for every call, `window` requests in flight at a time."""
    for start in range(0, len(call_ids), window):
        batch = call_ids[start:start + window]
        conn.sock.sendall(b"".join(json.dumps({"v": 1, "id": i, "op": "toolcall.end", "args": {"call_id": c}}).encode()
                                   + b"\n" for i, c in enumerate(batch)))
        for _ in batch:
            response = json.loads(conn.file.readline())
            if not response.get("ok"):
                raise SystemExit(f"toolcall.end failed: {response}")


def throughput(path: Path, clients: int, seconds: float) -> tuple[float, int]:
    """Calls (begin + end) per second over `clients` connections driven by one selector."""
    sel = selectors.DefaultSelector()
    state: dict[socket.socket, list] = {}
    for _ in range(clients):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(str(path))
        sock.setblocking(False)
        state[sock] = [bytearray(), None]          # input buffer, call id being ended (None: beginning)
        sel.register(sock, selectors.EVENT_READ)
    begin = json.dumps({"v": 1, "id": 1, "op": "toolcall.begin", "args": {"sandbox": "S", "tool": "load"}}).encode() + b"\n"
    done = errors = 0
    deadline = time.monotonic() + seconds
    started = time.monotonic()
    for sock in state:
        sock.sendall(begin)
    while time.monotonic() < deadline:
        for key, _ in sel.select(0.5):
            sock = key.fileobj
            buf = state[sock][0]
            chunk = sock.recv(65536)
            if not chunk:
                raise SystemExit("the daemon closed a load connection")
            buf += chunk
            while b"\n" in buf:
                line, _, rest = bytes(buf).partition(b"\n")
                buf[:] = rest
                response = json.loads(line)
                if not response.get("ok"):
                    errors += 1
                    state[sock][1] = None
                    sock.sendall(begin)
                    continue
                if state[sock][1] is None:
                    call_id = response["result"]["call_id"]
                    state[sock][1] = call_id
                    sock.sendall(json.dumps({"v": 1, "id": 2, "op": "toolcall.end",
                                             "args": {"call_id": call_id, "exit_code": 0}}).encode() + b"\n")
                else:
                    done += 1
                    state[sock][1] = None
                    if time.monotonic() < deadline:
                        sock.sendall(begin)
    elapsed = time.monotonic() - started
    # let the calls in flight finish before the connections go (their owner would be gone)
    drain_until = time.monotonic() + 10
    pending = {s for s, v in state.items() if v[1] is not None}
    while pending and time.monotonic() < drain_until:
        for key, _ in sel.select(0.5):
            sock = key.fileobj
            if sock in pending and b"\n" in sock.recv(65536):
                pending.discard(sock)
    for sock in state:
        sel.unregister(sock)
        sock.close()
    return done / elapsed, errors


def verdict(ok: bool) -> str:
    return "met" if ok else "NOT met"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=60, help="begins timed at each level")
    parser.add_argument("--idle-s", type=float, default=10.0)
    parser.add_argument("--load-s", type=float, default=10.0)
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=2, help="passes up and down the levels")
    parser.add_argument("--levels", default=",".join(map(str, LEVELS)), help="running calls at each latency level")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bench_daemon_scale: needs root (the daemon creates cgroups)", file=sys.stderr)
        return 2
    levels = [int(x) for x in args.levels.split(",")]
    d = DaemonProcess({"metrics": {"address": ""},
                       "limits": {"max_running_calls": 8192, "max_running_calls_per_sandbox": 8192},
                       "protocol": {"max_connections": 1024, "max_connections_per_uid": 1024}})
    try:
        t0 = time.monotonic()
        d.start()
        conn = Conn(d.socket_path)
        conn.request("sandbox.create", name="S")
        pid = d.proc.pid
        print(f"daemon pid {pid}, cgroup root {d.root}, eBPF off, {os.cpu_count()} CPUs")
        idle_base = idle_cpu(pid, args.idle_s)
        holder = Conn(d.socket_path)            # begins the running calls (this process owns them)
        held: list[str] = []
        running = 0
        times: dict[int, list[float]] = {level: [] for level in levels}
        passes: dict[int, list[float]] = {level: [] for level in levels}     # p50 of each pass
        cpu: dict[int, list[float]] = {level: [] for level in levels}        # daemon CPU per begin + end
        idle_loaded = None
        def measure(level: int) -> None:
            sample = begin_times(conn, args.samples, pid, cpu[level])
            times[level] += sample
            passes[level].append(percentiles(sample)[0])

        def hold(level: int) -> None:
            nonlocal running
            while running < level:
                held.append(holder.request("toolcall.begin", sandbox="S", tool="held")["call_id"])
                running += 1
            end_all(holder, held[level:])
            del held[level:]
            running = len(held)

        for round_ in range(args.rounds):
            for level in sorted(set(levels) | ({IDLE_CALLS} if round_ == 0 else set())):   # going up
                hold(level)
                if level == IDLE_CALLS:
                    idle_loaded = idle_cpu(pid, args.idle_s)
                if level in levels:
                    measure(level)
            for level in sorted(levels, reverse=True):            # coming down
                hold(level)
                measure(level)
        latency = {level: percentiles(times[level]) for level in levels}
        for level in levels:
            print(f"toolcall.begin with {level:5d} calls running: p50 {latency[level][0] * 1e3:7.2f} ms, "
                  f"p99 {latency[level][1] * 1e3:7.2f} ms  (p50 per pass: "
                  + ", ".join(f"{p * 1e3:.2f}" for p in passes[level])
                  + f" ms; daemon CPU per begin+end {statistics.mean(cpu[level]) * 1e3:.2f} ms)")
        print(f"  (set-up and latency levels: {time.monotonic() - t0:.0f} s)")
        end_all(holder, held)
        holder.close()
        conn.close()
        print(f"  (held calls ended: {time.monotonic() - t0:.0f} s)")
        cpu_before, loop_before, t_before = cpu_s(pid), thread_cpu_s(pid, pid), time.monotonic()
        rate, errors = throughput(d.socket_path, args.clients, args.load_s)
        calls_done = rate * args.load_s
        # the daemon's CPU per begin+end over the load (all its threads, and its loop's
        # thread alone: the loop is what one daemon cannot spread over more CPUs)
        load_cpu = ((cpu_s(pid) - cpu_before) / calls_done, (thread_cpu_s(pid, pid) - loop_before) / calls_done,
                    (cpu_s(pid) - cpu_before) / (time.monotonic() - t_before)) if calls_done else None
    finally:
        d.cleanup()
    base, top = latency[min(latency)], latency[max(latency)]
    ratio = top[0] / base[0]
    results = [
        (f"begin p50 at {max(latency)} / at {min(latency)} calls running", f"{ratio:.2f}x",
         f"<= {TARGET_BEGIN_RATIO:g}x", ratio <= TARGET_BEGIN_RATIO),
        (f"daemon idle CPU with {IDLE_CALLS} tracked calls (no calls: {idle_base * 100:.2f} %)",
         f"{idle_loaded * 100:.2f} %", f"< {TARGET_IDLE_CPU * 100:g} %", idle_loaded < TARGET_IDLE_CPU),
        (f"throughput, {args.clients} concurrent clients, begin+end ({errors} refused)", f"{rate:.0f} calls/s",
         f">= {TARGET_CALLS_PER_S:g} calls/s", rate >= TARGET_CALLS_PER_S),
    ]
    if load_cpu is not None:
        print(f"  (throughput load: daemon CPU per begin+end {load_cpu[0] * 1e3:.2f} ms, its loop thread "
              f"{load_cpu[1] * 1e3:.2f} ms; daemon busy {load_cpu[2] * 100:.0f} % of one CPU; "
              f"host load {os.getloadavg()[0]:.1f})")
    for name, value, target, ok in results:
        print(f"{name}: {value} (target {target}): {verdict(ok)}")
    return 0 if all(ok for *_, ok in results) else 1


if __name__ == "__main__":
    sys.exit(main())
