"""The GPU/KV-store benchmark: `agentcg gpu bench` with its defaults (see gpu/bench.py).

    .venv/bin/python bench/bench_gpu.py [agentcg gpu bench options]

Prints each store operation's bandwidth beside its ceiling measured in the same run, and
exits 1 ("targets: NOT met") when a row misses its target ratio.
"""
import sys

from agentcg.cli import main

if __name__ == "__main__":
    sys.exit(main(["gpu", "bench", "--fail-on-miss", *sys.argv[1:]]))
