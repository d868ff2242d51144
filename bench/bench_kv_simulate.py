"""Benchmark: `agentcg kv simulate` on the AgentCgroup sessions, every KV policy in one run.

Prints the comparison table, agentcg's job completion time ratios against the baselines
from the same run (targets: p50 at least 1.5x better than vllm-v1 and 1.1x better than
the better of infercept and continuum, with less GPU KV waste) and the wall time.
Usage: .venv/bin/python bench/bench_kv_simulate.py [DATASET_OR_TRACE] [--gpu h200]
"""
from __future__ import annotations

import argparse
import sys
import time

from agentcg.profiler.importers.agentcgroup import default_dataset_dir
from agentcg.profiler.kvsim_cost import gpu_preset
from agentcg.profiler.kvsim_report import build_config, compare, format_header, format_table
from agentcg.profiler.kvsim_sessions import load_sessions

POLICIES = ["vllm-v1", "infercept", "continuum", "continuum-paper", "agentcg"]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("source", nargs="?", default=str(default_dataset_dir()))
    parser.add_argument("--gpu", default="h200")
    args = parser.parse_args()
    started = time.perf_counter()
    loaded = load_sessions(args.source)
    config = build_config(loaded.sessions, gpu_preset(args.gpu))
    results = {r.policy: r for r in compare(loaded.sessions, POLICIES, config)}
    wall = time.perf_counter() - started
    print(format_header(loaded.sessions, config, loaded.source, loaded.imputed_durations, loaded.skipped))
    print()
    print(format_table(list(results.values())))
    print()
    ours = results["agentcg"]
    p50 = {name: r.jct_quantile(0.5) for name, r in results.items()}
    best_name = min(("infercept", "continuum"), key=lambda n: p50[n])
    rows = [
        ("vllm-v1", 1.5),
        (f"better of infercept and continuum ({best_name})", 1.1),
        ("continuum-paper (paper TTL rule, not required)", 1.1),
    ]
    met = True
    for label, target in rows:
        name = label.split(" ")[0] if not label.startswith("better") else best_name
        ratio = p50[name] / p50["agentcg"]
        waste_less = ours.gpu_kv_waste_gbs < results[name].gpu_kv_waste_gbs
        ok = ratio >= target and waste_less
        if not label.endswith("not required)"):
            met &= ok
        print(f"agentcg JCT p50 vs {label}: {p50[name]:,.0f} s / {p50['agentcg']:,.0f} s = {ratio:.2f}x "
              f"(target {target}x); p95 {results[name].jct_quantile(0.95) / ours.jct_quantile(0.95):.2f}x; "
              f"KV waste {ours.gpu_kv_waste_gbs:,.0f} vs {results[name].gpu_kv_waste_gbs:,.0f} GB·s "
              f"-> {'met' if ok else 'NOT met'}")
    print(f"targets: {'met' if met else 'NOT met'}; wall time for {len(POLICIES)} policies on "
          f"{len(loaded.sessions)} sessions: {wall:.1f} s (limit 60 s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
