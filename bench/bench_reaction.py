"""Benchmark (2): the daemon's reaction time, from the kernel's timestamp of a memory
threshold crossing to the daemon's freeze write returning.

A real `agentcg daemon` (controller/daemon/testing.py: its own socket, state and cgroup
root) runs policy `agentcg` with a sandbox of --budget (throttle = freeze at 80%, kill at
99%, no growth projection, a grace long enough that nothing is killed). Each round begins a
tool call through the daemon's socket, starts a worker in it that touches --alloc MiB
(crossing 80% of the budget on the way), waits for the daemon's "freeze" event of that call
in its event log (`events.since`), then kills the worker and ends the call.

The crossing's timestamp is the kernel's (bpf_ktime_get_ns = CLOCK_MONOTONIC): the
daemon's own eBPF event when that is what it acted on, else this benchmark's own observer
(kmem:rss_stat) at 1 MiB below the threshold the daemon arms (the tick/PSI baseline, and a
freeze the daemon made on a memcg eventfd; pessimistic by the time to touch that 1 MiB); the freeze's write-return time is the daemon's own
(`detail.applied_monotonic_s`: its write to cgroup.freeze returned, time.monotonic() in the
daemon). Reaction = the difference. Also printed: until the cgroup reported every task
frozen (`done_monotonic_s`), which waits for the worker to be scheduled once more.
Both cores are kept busy by two busy-loop processes during every mode.

Modes (each a fresh daemon):
  kernel/SCHED_OTHER  eBPF ring buffer + memcg thresholds in the daemon's epoll, default scheduling
  kernel/SCHED_FIFO   the same, the loop as SCHED_FIFO 1, as the systemd unit runs it
  tick+PSI (baseline) no eBPF, no kernel thresholds: the daemon acts on its 0.5 s tick or a PSI trigger
Target: p99 <= 5 ms in both kernel modes (anchors: systemd-oomd polls every 1 s over 30 s
windows, oomd every 5 s). Exit 1 and "NOT met" on a miss.

    sudo .venv/bin/python bench/bench_reaction.py [--rounds 200] [--tick-rounds 40]
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time

from agentcg.bpf.events import RssThresholdEvent
from agentcg.bpf.monitor import BpfMonitor
from agentcg.client import spawn_into
from agentcg.controller.core.thresholds import Thresholds, call_threshold_bytes
from agentcg.controller.daemon.testing import DaemonProcess, read_line
from agentcg.policies.sandbox import GraduatedConfig

TARGET_P99_S = 0.005
MiB = 2**20
FRACTION = 0.8
WORKER = ("import sys\nb = bytearray({mib} << 20)\nsys.stdout.write('held\\n'); sys.stdout.flush()\n"
          "sys.stdin.read()\n")


class Session:
    """One persistent connection to the daemon."""

    def __init__(self, d: DaemonProcess) -> None:
        self.sock = d.connect(30)
        self.ids = 0

    def call(self, op: str, **args: object) -> dict:
        self.ids += 1
        self.sock.sendall(json.dumps({"v": 1, "id": self.ids, "op": op, "args": args}).encode() + b"\n")
        response = json.loads(read_line(self.sock))
        if not response.get("ok"):
            raise RuntimeError(f"{op}: {response}")
        return response["result"]

    def close(self) -> None:
        self.sock.close()


def policy_section(budget_mib: int, kernel: bool) -> dict:
    return {"name": "agentcg", "tick_s": 0.5, "throttle_at": FRACTION, "freeze_at": FRACTION, "kill_at": 0.99,
            "relax_below": 0.5, "lookahead_s": 0, "grace_s": 600, "kernel_thresholds": kernel}


def run_mode(name: str, rounds: int, budget_mib: int, alloc_mib: int, *, kernel: bool, fifo: bool,
             observer: BpfMonitor) -> dict:
    sections = {"policy": policy_section(budget_mib, kernel), "limits": {"grace_s": 0.0},
                "ebpf": {"mode": "on", "concerns": ["process", "memory", "faults"]} if kernel else {"mode": "off"},
                "daemon": {"realtime_priority": 1 if fifo else 0}}
    d = DaemonProcess(sections)
    latencies, confirmed, missed, sources, clocks = [], [], 0, {}, {}
    thresholds = Thresholds((FRACTION,))
    try:
        d.start()
        t_start = time.monotonic()
        s = Session(d)
        s.call("sandbox.create", name="bench", memory_budget_bytes=budget_mib * MiB)
        seq = 1
        for i in range(rounds):
            # a new tool name each round: the learned peak of "alloc" would (rightly) hold the
            # next call back until the sandbox has room for it
            begun = s.call("toolcall.begin", sandbox="bench", tool=f"alloc-{i}", grace_s=0.0)
            cgroup_id = begun["cgroup_id"]
            scope = int(d_memory(d, "bench"))
            # 1 MiB below the daemon's own threshold, so the observer sees the crossing even when
            # the daemon freezes the worker right at its threshold (pessimistic by the time the
            # worker takes to touch 1 MiB, about 0.1 ms)
            observer.watch(cgroup_id, rss_threshold_bytes=call_threshold_bytes(budget_mib * MiB, scope, 0,
                                                                               thresholds) - MiB)
            worker = spawn_into(begun["cgroup_procs"], [sys.executable, "-S", "-c", WORKER.format(mib=alloc_mib)],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE)
            crossed = freeze = None
            own: dict[float, dict] = {}        # the daemon's own eBPF crossings, by kernel timestamp
            deadline = time.monotonic() + 5.0
            while (crossed is None or freeze is None) and time.monotonic() < deadline:
                for event in observer.poll(0.002):
                    if isinstance(event, RssThresholdEvent) and event.cgroup_id == cgroup_id and crossed is None:
                        crossed = event.monotonic_s
                page = s.call("events.since", seq=seq, sandbox="bench")
                seq = page["next_seq"]
                for event in page["events"]:
                    if event["kind"] == "freeze" and event["call_id"] == begun["call_id"]:
                        freeze = event
                    elif event["kind"] == "threshold":
                        sources[event["detail"].get("source", "?")] = sources.get(event["detail"].get("source"), 0) + 1
                        if event["detail"].get("source") == "ebpf" and event["call_id"] == begun["call_id"]:
                            own[event["detail"]["kernel_monotonic_s"]] = event
            if freeze is not None and freeze["detail"]["observed_monotonic_s"] in own:
                crossed = freeze["detail"]["observed_monotonic_s"]    # the kernel's stamp of the daemon's own crossing
                clocks["daemon's eBPF event"] = clocks.get("daemon's eBPF event", 0) + 1
            elif crossed is not None:
                clocks["benchmark's observer"] = clocks.get("benchmark's observer", 0) + 1
            if crossed is not None and freeze is not None and freeze["detail"]["ok"]:
                latencies.append(freeze["detail"]["applied_monotonic_s"] - crossed)
                confirmed.append(freeze["detail"]["done_monotonic_s"] - crossed)
            else:
                missed += 1
            worker.send_signal(signal.SIGKILL)       # a frozen v2 task still dies of SIGKILL
            worker.wait()
            worker.stdout.close()
            worker.stdin.close()
            s.call("toolcall.end", call_id=begun["call_id"], signal=9)
            try:
                observer.forget(cgroup_id)
            except Exception:
                pass
        s.close()
        per_round = (time.monotonic() - t_start) / max(1, rounds)
    finally:
        d.cleanup()
    return {"name": name, "latencies": latencies, "confirmed": confirmed, "missed": missed, "sources": sources,
            "round_s": per_round, "clocks": clocks}


def d_memory(d: DaemonProcess, sandbox: str) -> int:
    from agentcg.controller.cgroup import open_tree
    return open_tree(root=d.root).memory_current(sandbox)


def summary(latencies: list[float]) -> str:
    if len(latencies) < 2:
        return f"(n={len(latencies)}: too few to summarise)"
    q = statistics.quantiles(latencies, n=100, method="inclusive")
    return (f"p50 {q[49] * 1e3:7.2f} ms  p99 {q[98] * 1e3:7.2f} ms  max {max(latencies) * 1e3:7.2f} ms"
            f"  (n={len(latencies)})")


def p99(latencies: list[float]) -> float | None:
    return statistics.quantiles(latencies, n=100, method="inclusive")[98] if len(latencies) >= 2 else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=200, help="crossings per kernel mode (>= 200 for the target)")
    parser.add_argument("--tick-rounds", type=int, default=40, help="crossings for the tick/PSI baseline")
    parser.add_argument("--budget-mib", type=int, default=128)
    parser.add_argument("--alloc-mib", type=int, default=112)
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench_reaction: run as root (it starts a daemon and loads eBPF)")
    started = time.monotonic()
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(os.cpu_count() or 2)]
    results = []
    try:
        with BpfMonitor(concerns=("process", "memory", "faults")) as observer:   # RSS: the opt-in per-fault concern
            for name, kernel, fifo, rounds in (("kernel/SCHED_OTHER", True, False, args.rounds),
                                               ("kernel/SCHED_FIFO", True, True, args.rounds),
                                               ("tick+PSI (baseline)", False, False, args.tick_rounds)):
                results.append(run_mode(name, rounds, args.budget_mib, args.alloc_mib, kernel=kernel, fifo=fifo,
                                        observer=observer))
                print(f"  {name:22s} {summary(results[-1]['latencies'])}  missed {results[-1]['missed']}  "
                      f"daemon saw {results[-1]['sources'] or 'no kernel threshold'}, "
                      f"{results[-1]['round_s']:.2f} s per round", flush=True)
                print(f"  {'':22s} to every task confirmed frozen: {summary(results[-1]['confirmed'])}; crossing "
                      f"stamped by {results[-1]['clocks']}", flush=True)
    finally:
        for p in busy:
            p.kill()
            p.wait()
    print(f"Reaction, kernel timestamp of the crossing -> the daemon's freeze write returning; {os.cpu_count()} "
          f"CPUs all busy; sandbox {args.budget_mib} MiB, worker {args.alloc_mib} MiB, threshold "
          f"{FRACTION:.0%}; {time.monotonic() - started:.0f} s")
    ok = True
    base = results[2]
    for r in results[:2]:
        value = p99(r["latencies"])
        met = value is not None and value <= TARGET_P99_S and r["missed"] == 0 and len(r["latencies"]) >= 200
        ok &= met
        ratio = (f", {p99(base['latencies']) / value:.0f}x faster than the tick/PSI baseline"
                 if value and p99(base["latencies"]) else "")
        print(f"  target {r['name']}: p99 <= {TARGET_P99_S * 1e3:.0f} ms over >= 200 crossings, none missed: "
              f"{'met' if met else 'NOT met'} (p99 {value * 1e3 if value else float('nan'):.2f} ms, "
              f"n={len(r['latencies'])}, missed {r['missed']}{ratio})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
