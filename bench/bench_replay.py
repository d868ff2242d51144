"""Replay three recorded sessions under a host budget: `static` against `agentcg`.

Sessions (agentcgroup-swe-local), chosen because their memory is in tool calls, not in
the agent, and their bursts are large but fit this 2-core, 24 GiB host:
  pydicom__pydicom-2065 (high)  605 s, one pytest call bursting to 1.9 GiB
  dask__dask-5510 (low)         419 s, two pytest calls at 1.3 GiB
  All-Hands-AI__openhands-resolver-137 (low)  253 s, a 79 s pip install growing to 650 MiB
Sum of peaks 3.9 GiB; budget 3 GiB, so static caps each sandbox at 1 GiB.
Each repetition replays unconstrained (policy none, no budget) as the reference, then
static, then agentcg, at --speed 20 (about 35 s each; 5 repetitions ~ 9 min).
Slowdown = completion of the high-priority session / its unconstrained completion in
the same repetition. Utilisation = host memory (peak, time mean) / budget.

    .venv/bin/python bench/bench_replay.py [--runs 5] [--speed 20] [--budget 3GiB]
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

SESSIONS = ["pydicom__pydicom-2065=high", "dask__dask-5510=low", "All-Hands-AI__openhands-resolver-137=low"]
AGENTCG = str(Path(sys.executable).with_name("agentcg"))


def replay(policy: str, budget: str | None, speed: float) -> dict:
    argv = [AGENTCG, "replay", "--policy", policy, "--speed", str(speed), "--json",
            "--cgroup-root", f"agentcg-bench-{secrets.token_hex(4)}"]
    for session in SESSIONS:
        argv += ["--session", session]
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
    parser.add_argument("--speed", type=float, default=20.0)
    parser.add_argument("--budget", default="3GiB")
    args = parser.parse_args()
    started = time.monotonic()
    rows: dict[str, list[dict]] = {"static": [], "agentcg": []}
    for i in range(args.runs):
        ref = replay("none", None, args.speed)
        ref_high = next(s for s in ref["sessions"] if s["priority"] == "high")["completion_s"]
        for policy in rows:
            out = replay(policy, args.budget, args.speed)
            high = next(s for s in out["sessions"] if s["priority"] == "high")
            rows[policy].append({
                "survived": sum(s["survived"] for s in out["sessions"]), "sessions": len(out["sessions"]),
                "killed": out["calls_killed"], "oom": out["oom_kills"],
                "slowdown": (high["completion_s"] / ref_high) if high["completion_s"] else None,
                "peak": out["host_peak_bytes"] / out["budget_bytes"], "mean": out["host_mean_bytes"] / out["budget_bytes"],
                "actions": out["actions"], "ref_peak": ref["host_peak_bytes"] / out["budget_bytes"],
            })
            print(f"run {i + 1} {policy:8s} survived {rows[policy][-1]['survived']}/{len(out['sessions'])} "
                  f"killed {out['calls_killed']} (oom {out['oom_kills']}) high {high['completion_s']} s vs "
                  f"unconstrained {ref_high:.1f} s, actions {out['actions']}", flush=True)
    print(f"\nbench_replay: {len(SESSIONS)} sessions, budget {args.budget}, speed {args.speed:g}x, "
          f"{args.runs} runs per policy, {time.monotonic() - started:.0f} s")
    print(f"unconstrained peak / budget: {spread([r['ref_peak'] for r in rows['static']])}")
    for policy, runs in rows.items():
        slow = [r["slowdown"] for r in runs if r["slowdown"] is not None]
        print(f"{policy}:")
        print(f"  sessions survived      {spread([r['survived'] for r in runs], '{:.1f}')} of {runs[0]['sessions']}")
        print(f"  tool calls killed      {spread([r['killed'] for r in runs], '{:.1f}')}  (OOM kills "
              f"{spread([r['oom'] for r in runs], '{:.1f}')})")
        print(f"  high-priority slowdown {spread(slow, '{:.3f}')}x vs unconstrained"
              + (f"  ({len(runs) - len(slow)} runs lost it)" if len(slow) < len(runs) else ""))
        print(f"  memory peak / budget   {spread([r['peak'] for r in runs])}")
        print(f"  memory mean / budget   {spread([r['mean'] for r in runs])}")
    a, s = rows["agentcg"], rows["static"]
    lost = sum(r["sessions"] - r["survived"] for r in a)
    slow = [r["slowdown"] for r in a if r["slowdown"] is not None]
    print("targets (agentcg): no session lost: " + ("met" if lost == 0 else f"NOT met ({lost} lost)")
          + f"; high-priority slowdown <= 1.05x: "
          + ("met" if slow and statistics.mean(slow) <= 1.05 else f"NOT met (mean {statistics.mean(slow):.3f}x)"
             if slow else "NOT met")
          + "; fewer calls killed than static: "
          + ("met" if statistics.mean([r['killed'] for r in a]) < statistics.mean([r['killed'] for r in s])
             else "NOT met"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
