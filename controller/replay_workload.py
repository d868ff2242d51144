"""The process that stands in for a recorded tool call or agent during `agentcg replay`.

Run as a script (`python replay_workload.py call|agent`), standard library only, so that
it starts fast and its memory is what it allocates. Memory is anonymous mmap chunks
touched page by page (freed by munmap, so it really goes back); CPU is a busy loop
measured in process CPU time.

call:  reads one JSON line {"steps": [[min_wall_s, target_bytes, cpu_s], ...]}, then
       waits for a line "go"; for each step it moves its memory to target_bytes, burns
       cpu_s of CPU and waits until the step has lasted min_wall_s. Frozen or throttled,
       it just takes longer. Exits 0 when done, after writing one JSON line
       {"alloc_s": [...]} to stdout: how long each chunk (8 MiB) took to map and fault in
       (at most MAX_SAMPLES, evenly thinned), the allocation latency replay reports.
agent: reads lines "<target_bytes> <cpu_cores>" and follows them (burning CPU at that
       duty cycle) until stdin closes; then exits 0.
"""
from __future__ import annotations

import json
import mmap
import os
import select
import sys
import time

PAGE = 4096
CHUNK_BYTES = 8 << 20
HUGE = getattr(mmap, "MADV_HUGEPAGE", None)
SLICE_S = 0.01
MAX_SAMPLES = 2048


class Memory:
    def __init__(self) -> None:
        self.chunks: list[mmap.mmap] = []
        self.size = 0
        self.alloc_s: list[float] = []

    def resize(self, target: int) -> None:
        target = max(0, (int(target) // PAGE) * PAGE)
        while self.size > target:
            length = len(self.chunks[-1])
            keep = length - min(length, self.size - target)
            self.chunks.pop().close()
            self.size -= length
            if keep:
                self._add(keep)
        while self.size < target:
            self._add(min(CHUNK_BYTES, target - self.size))

    def _add(self, size: int) -> None:
        started = time.monotonic()
        chunk = mmap.mmap(-1, size)
        if HUGE is not None:
            chunk.madvise(HUGE)   # 2 MiB pages where THP is "madvise": faulting in 1 GiB takes ~1/4 the time
        chunk[::PAGE] = b"\x01" * len(range(0, size, PAGE))   # fault every page in
        self.chunks.append(chunk)
        self.size += size
        if size == CHUNK_BYTES:
            self.alloc_s.append(time.monotonic() - started)


def burn(cpu_s: float) -> None:
    end = time.process_time() + cpu_s
    x = 0
    while time.process_time() < end:
        for i in range(2000):
            x += i


def run_call() -> int:
    spec = json.loads(sys.stdin.readline())
    if sys.stdin.readline().strip() != "go":
        return 3
    memory = Memory()
    for min_wall_s, target_bytes, cpu_s in spec["steps"]:
        started = time.monotonic()
        memory.resize(target_bytes)
        burn(cpu_s)
        left = min_wall_s - (time.monotonic() - started)
        if left > 0:
            time.sleep(left)
    samples = memory.alloc_s
    if len(samples) > MAX_SAMPLES:
        samples = samples[::len(samples) // MAX_SAMPLES + 1]
    sys.stdout.write(json.dumps({"alloc_s": [round(x, 6) for x in samples]}) + "\n")
    sys.stdout.flush()
    return 0


def run_agent() -> int:
    memory = Memory()
    cores = 0.0
    stdin = sys.stdin.fileno()
    buffered = b""
    while True:
        ready, _, _ = select.select([stdin], [], [], SLICE_S * (1 - cores) if cores else 1.0)
        if ready:
            data = os.read(stdin, 65536)
            if not data:
                return 0
            buffered += data
            *lines, buffered = buffered.split(b"\n")
            if lines:
                target, cores_text = lines[-1].split()
                memory.resize(int(target))
                cores = min(1.0, max(0.0, float(cores_text)))
        if cores:
            burn(SLICE_S * cores)


def main(argv: list[str]) -> int:
    if argv[1:] == ["call"]:
        return run_call()
    if argv[1:] == ["agent"]:
        return run_agent()
    print("usage: replay_workload.py call|agent", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
