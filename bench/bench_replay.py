"""Replay recorded sessions whose bursts overlap under a host budget: none, static, agentcg.

Scenario (agentcgroup-swe-local): the three sessions whose largest tool call is largest,
each cut to a 40 s window of its recording that starts 5 s before that call, so the three
bursts start together (time-aligned; `agentcg replay --session ID=PRIO@FROM:TO`):
  pydicom__pydicom-2065 (high)                          pytest to ~1.9 GiB
  dask__dask-5510 (low)                                 pytest to ~1.3 GiB
  Aarhus-Psychiatry-Research__timeseriesflattener-186 (low)  ~0.8 GiB for ~58 s
Together ~4 GiB against a 3 GiB budget; each fits alone, so something has to be done.
  none     only the kernel: memory.max of the replay's parent, the OOM killer picks
  static   each sandbox capped at budget / 3 (1 GiB) with memory.max, like `docker run -m`
  agentcg  the graduated policy (throttle, freeze the low-priority calls, thaw later)
Each run first replays once unconstrained (policy none, no budget) as the reference of the
same run. --runs runs per policy (default 5), mean ± sd (min, max).
Measures: sessions survived, tool calls killed (OOM + policy), high-priority slowdown
(completion / unconstrained completion), P95 allocation latency of the high-priority
session (time per 8 MiB chunk mapped and faulted in, replay_workload.py), memory peak.
Targets (agentcg): no session lost, fewer calls killed than static, high-priority
slowdown <= 1.05x. Exit 1 and "NOT met" on a miss.

    sudo .venv/bin/python bench/bench_replay.py [--runs 5] [--speed 5] [--budget 3GiB]
"""
from __future__ import annotations

import argparse
import json
import secrets
import statistics
import subprocess
import sys
import time
from pathlib import Path

SESSIONS = [("pydicom__pydicom-2065", "high"), ("dask__dask-5510", "low"),
            ("Aarhus-Psychiatry-Research__timeseriesflattener-186", "low")]
LEAD_S = 5.0           # recorded seconds of each session before its largest call
WINDOW_S = 40.0        # recorded seconds replayed per session
# The three sessions' recorded CPU together exceeds this host's 2 cores; memory is what is
# studied here, so the CPU they burn is scaled down (agentcg replay --cpu-scale).
CPU_SCALE = 0.25
AGENTCG = str(Path(sys.executable).with_name("agentcg"))
POLICIES = ("none", "static", "agentcg")


def windows() -> list[str]:
    """ID=PRIORITY@FROM:TO with FROM = the largest call's start - LEAD_S (recorded seconds)."""
    from agentcg.controller.replay_session import load_trace
    from agentcg.profiler.importers.agentcgroup import default_dataset_dir

    trace = load_trace(default_dataset_dir(), [s for s, _ in SESSIONS])
    out = []
    for session_id, priority in SESSIONS:
        calls = trace.toolcalls[trace.toolcalls["session_id"] == session_id]
        start = float(trace.sessions.set_index("session_id").loc[session_id, "start_s"])
        top = calls.sort_values("peak_memory_bytes", ascending=False).iloc[0]
        begin = max(0.0, float(top["start_wall_s"]) - start - LEAD_S)
        out.append(f"{session_id}={priority}@{begin:.1f}:{begin + WINDOW_S:.1f}")
    return out


def replay(choices: list[str], policy: str, budget: str | None, speed: float) -> dict:
    argv = [AGENTCG, "replay", "--policy", policy, "--speed", str(speed), "--json", "--cpu-scale", str(CPU_SCALE),
            "--cgroup-root", f"agentcg-bench-{secrets.token_hex(4)}"]
    for choice in choices:
        argv += ["--session", choice]
    if budget:
        argv += ["--budget", budget]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        sys.exit(f"bench: {' '.join(argv)} failed ({done.returncode}):\n{done.stderr}")
    return json.loads(done.stdout)


def spread(values: list[float], fmt: str = "{:.2f}") -> str:
    if not values:
        return "-"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{fmt.format(statistics.mean(values))} ± {fmt.format(sd)} (min {fmt.format(min(values))}, " \
           f"max {fmt.format(max(values))})"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--speed", type=float, default=5.0)
    parser.add_argument("--budget", default="3GiB")
    args = parser.parse_args()
    started = time.monotonic()
    choices = windows()
    rows: dict[str, list[dict]] = {p: [] for p in POLICIES}
    for i in range(args.runs):
        ref = replay(choices, "none", None, args.speed)
        ref_high = next(s for s in ref["sessions"] if s["priority"] == "high")
        for policy in POLICIES:
            out = replay(choices, policy, args.budget, args.speed)
            high = next(s for s in out["sessions"] if s["priority"] == "high")
            rows[policy].append({
                "survived": sum(s["survived"] for s in out["sessions"]), "sessions": len(out["sessions"]),
                "killed": out["calls_killed"], "oom": out["oom_kills"],
                "slowdown": (high["completion_s"] / ref_high["completion_s"])
                if high["completion_s"] and ref_high["completion_s"] else None,
                "alloc_p95": high.get("alloc_p95_s"), "ref_alloc_p95": ref_high.get("alloc_p95_s"),
                "peak": out["host_peak_bytes"] / out["budget_bytes"], "actions": out["actions"],
                "ref_peak": ref["host_peak_bytes"] / out["budget_bytes"],
            })
            r = rows[policy][-1]
            print(f"run {i + 1} {policy:8s} survived {r['survived']}/{r['sessions']} killed {r['killed']} "
                  f"(oom {r['oom']}) high {high['completion_s']} s vs unconstrained {ref_high['completion_s']} s, "
                  f"high alloc P95 {r['alloc_p95']}, actions {out['actions']}", flush=True)
    print(f"\nbench_replay: {len(SESSIONS)} sessions time-aligned at their largest call "
          f"({', '.join(choices)}), budget {args.budget}, speed {args.speed:g}x, {args.runs} runs per policy, "
          f"{time.monotonic() - started:.0f} s")
    print(f"unconstrained peak / budget: {spread([r['ref_peak'] for r in rows['none']])}; unconstrained high-priority "
          f"alloc P95 {spread([r['ref_alloc_p95'] * 1e3 for r in rows['none'] if r['ref_alloc_p95']], '{:.1f}')} ms")
    for policy, runs in rows.items():
        slow = [r["slowdown"] for r in runs if r["slowdown"] is not None]
        alloc = [r["alloc_p95"] * 1e3 for r in runs if r["alloc_p95"] is not None]
        print(f"{policy}:")
        print(f"  sessions survived      {spread([r['survived'] for r in runs], '{:.1f}')} of {runs[0]['sessions']}")
        print(f"  tool calls killed      {spread([r['killed'] for r in runs], '{:.1f}')}  (by the OOM killer "
              f"{spread([r['oom'] for r in runs], '{:.1f}')})")
        print(f"  high-priority slowdown {spread(slow, '{:.3f}')}x vs unconstrained"
              + (f"  ({len(runs) - len(slow)} runs lost it)" if len(slow) < len(runs) else ""))
        print(f"  high-priority alloc P95 {spread(alloc, '{:.1f}')} ms")
        print(f"  memory peak / budget   {spread([r['peak'] for r in runs])}")
    a, s = rows["agentcg"], rows["static"]
    lost = sum(r["sessions"] - r["survived"] for r in a)
    slow = [r["slowdown"] for r in a if r["slowdown"] is not None]
    killed_a, killed_s = statistics.mean(r["killed"] for r in a), statistics.mean(r["killed"] for r in s)
    targets = [
        ("agentcg loses no session", lost == 0, f"{lost} lost"),
        ("agentcg kills fewer calls than static", killed_a < killed_s, f"{killed_a:.1f} vs {killed_s:.1f}"),
        ("high-priority slowdown <= 1.05x", bool(slow) and len(slow) == len(a) and statistics.mean(slow) <= 1.05,
         f"mean {statistics.mean(slow):.3f}x" if slow else "lost"),
    ]
    for name, met, value in targets:
        print(f"target {name}: {'met' if met else 'NOT met'} ({value})")
    return 0 if all(met for _, met, _ in targets) else 1


if __name__ == "__main__":
    sys.exit(main())
