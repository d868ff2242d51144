"""The GPU/KV-store benchmark: `agentcg gpu bench` with its defaults (see gpu/bench.py).

    .venv/bin/python bench/bench_gpu.py [agentcg gpu bench options]

Prints each store operation's bandwidth beside its ceiling measured in the same run.
"""
import sys

from agentcg.cli import main

if __name__ == "__main__":
    sys.exit(main(["gpu", "bench", *sys.argv[1:]]))
