"""Spawn cost of a tool call: /bin/true inside a fresh cgroup (create, spawn, wait,
remove) against a bare spawn of /bin/true, measured interleaved in the same run.

    .venv/bin/python bench/bench_spawn.py [--runs 300]

Prints p50 and p99 of both and the added milliseconds. Target: <= 2 ms added at p50.
"""
from __future__ import annotations

import argparse
import secrets
import statistics
import subprocess
import time

from agentcg.controller.cgroup import open_tree

TARGET_ADDED_P50_MS = 2.0


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def bare_spawn() -> float:
    start = time.perf_counter()
    subprocess.Popen(["/bin/true"]).wait()
    return time.perf_counter() - start


def cgroup_spawn(tree, name: str) -> float:
    start = time.perf_counter()
    tree.create(name)
    tree.spawn(name, ["/bin/true"]).wait()
    tree.remove(name)
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=300)
    args = parser.parse_args()
    tree = open_tree(root=f"agentcg-bench-{secrets.token_hex(4)}")
    bare: list[float] = []
    in_cgroup: list[float] = []
    try:
        for i in range(10):  # warm-up: page cache, dentries, the tree's root
            bare_spawn()
            cgroup_spawn(tree, f"warm{i}")
        for i in range(args.runs):  # interleaved so load from elsewhere hits both alike
            bare.append(bare_spawn())
            in_cgroup.append(cgroup_spawn(tree, f"call-{i}"))
    finally:
        if tree.exists(""):
            tree.remove("")
    ms = lambda v: v * 1e3
    b50, b99 = ms(_percentile(bare, 0.50)), ms(_percentile(bare, 0.99))
    c50, c99 = ms(_percentile(in_cgroup, 0.50)), ms(_percentile(in_cgroup, 0.99))
    print(f"spawn /bin/true, {args.runs} runs each, interleaved; cgroup layout: {tree.kind} "
          f"({len(tree._hierarchy_bases())} hierarchies joined)")
    print(f"baseline  bare Popen:                 p50 {b50:.3f} ms  p99 {b99:.3f} ms  mean {ms(statistics.mean(bare)):.3f} ms")
    print(f"agentcg   create+spawn+wait+remove:   p50 {c50:.3f} ms  p99 {c99:.3f} ms  mean {ms(statistics.mean(in_cgroup)):.3f} ms")
    print(f"added     p50 {c50 - b50:+.3f} ms  p99 {c99 - b99:+.3f} ms  (ratio p50 {c50 / b50:.2f}x); "
          f"target <= {TARGET_ADDED_P50_MS:.1f} ms added at p50: {'met' if c50 - b50 <= TARGET_ADDED_P50_MS else 'NOT met'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
