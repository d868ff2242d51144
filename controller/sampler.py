"""Periodic readings of one sandbox and of each of its running tool calls.

    sampler = SandboxSampler(tree, "sb1")
    for sample in sampler.sample(running_calls):     # one per scope, typed
        recorder.add_sample(session_id, "sb1", sample.time_s, **sample.trace_columns())

The sandbox scope reads `<sandbox>` (hierarchical: the agent cgroup plus every tool call);
the toolcall scope reads each call's own cgroup. CPU use is the difference of the cgroup's
cumulative CPU seconds between two samples of the same scope, so the first sample of a
call covers the time since the call began. A cgroup that vanishes between listing and
reading (a call that just ended) is skipped, not an error.
"""
from __future__ import annotations

import time
from typing import Any, Callable, NamedTuple, Sequence

from agentcg.controller.cgroup import CgroupTree
from agentcg.errors import AgentcgError, CgroupGone

SCOPE_SANDBOX = "sandbox"
SCOPE_TOOLCALL = "toolcall"
MAX_TRACKED_CALLS = 4096      # CPU baselines kept; = ToolCallManager's MAX_RUNNING_CALLS


class CallRef(NamedTuple):
    """What the sampler needs of a running tool call (ToolCall has these attributes)."""

    call_id: str
    path: str                 # relative to the tree's root
    start_monotonic_s: float


class CgroupSample(NamedTuple):
    scope: str                # SCOPE_SANDBOX or SCOPE_TOOLCALL
    call_id: str | None       # the call measured (toolcall) or the last call started (sandbox)
    time_s: float             # epoch seconds
    memory_bytes: int | None
    cpu_s: float | None       # cumulative CPU seconds of the cgroup
    cpu_cores: float | None   # over the time since the previous sample of this scope
    psi_memory_some_avg10_pct: float | None
    psi_memory_full_avg10_pct: float | None
    psi_memory_some_total_s: float | None
    psi_memory_full_total_s: float | None
    psi_cpu_some_total_s: float | None
    psi_io_some_total_s: float | None

    def trace_columns(self) -> dict[str, Any]:
        """The columns of the trace's `samples` table (agentcg.profiler.trace.SAMPLE_SCHEMA).
        The avg10 figures and the cumulative CPU seconds have no column there: they serve
        the live status line only."""
        return {"scope": self.scope, "call_id": self.call_id, "memory_bytes": self.memory_bytes,
                "cpu_cores": self.cpu_cores, "psi_memory_some_total_s": self.psi_memory_some_total_s,
                "psi_memory_full_total_s": self.psi_memory_full_total_s,
                "psi_cpu_some_total_s": self.psi_cpu_some_total_s, "psi_io_some_total_s": self.psi_io_some_total_s}


class SandboxSampler:
    def __init__(self, tree: CgroupTree, sandbox: str, *,
                 clock: Callable[[], float] = time.monotonic, wall: Callable[[], float] = time.time) -> None:
        self.tree = tree
        self.sandbox = sandbox
        self._clock = clock
        self._wall = wall
        self._has_psi = "psi" in tree.capabilities
        self._has_memory = "memory.max" in tree.capabilities
        self._last_cpu: dict[str, tuple[float, float]] = {}    # scope key -> (monotonic_s, cpu_s)
        self._start_mono = clock()

    def sample(self, calls: Sequence[CallRef | Any] = ()) -> list[CgroupSample]:
        """One sample of the sandbox (first) and one per running call, taken now."""
        latest = max(calls, key=lambda c: c.start_monotonic_s, default=None)
        out = []
        whole = self._read(self.sandbox, SCOPE_SANDBOX, SCOPE_SANDBOX,
                           latest.call_id if latest is not None else None, self._start_mono)
        if whole is not None:
            out.append(whole)
        live = set()
        for call in calls:
            live.add(call.call_id)
            reading = self._read(call.path, call.call_id, SCOPE_TOOLCALL, call.call_id, call.start_monotonic_s)
            if reading is not None:
                out.append(reading)
        for key in [k for k in self._last_cpu if k != SCOPE_SANDBOX and k not in live]:
            del self._last_cpu[key]
        return out

    def _read(self, path: str, key: str, scope: str, call_id: str | None, since_s: float) -> CgroupSample | None:
        now_mono, now_wall = self._clock(), self._wall()
        try:
            memory = self.tree.memory_current(path) if self._has_memory else None
            cpu_s = self._cpu_s(path)
            mem_p = self.tree.pressure(path, "memory") if self._has_psi else None
            cpu_p = self.tree.pressure(path, "cpu") if self._has_psi else None
            io_p = self.tree.pressure(path, "io") if self._has_psi else None
        except CgroupGone:
            return None
        cores = None
        if cpu_s is not None:
            prev_mono, prev_cpu = self._last_cpu.get(key, (since_s, 0.0))
            if now_mono > prev_mono:
                cores = max(0.0, (cpu_s - prev_cpu) / (now_mono - prev_mono))
            if key in self._last_cpu or len(self._last_cpu) < MAX_TRACKED_CALLS:
                self._last_cpu[key] = (now_mono, cpu_s)
        return CgroupSample(
            scope=scope, call_id=call_id, time_s=now_wall, memory_bytes=memory, cpu_s=cpu_s, cpu_cores=cores,
            psi_memory_some_avg10_pct=mem_p.some.avg10 if mem_p else None,
            psi_memory_full_avg10_pct=mem_p.full.avg10 if mem_p else None,
            psi_memory_some_total_s=mem_p.some.total_s if mem_p else None,
            psi_memory_full_total_s=mem_p.full.total_s if mem_p else None,
            psi_cpu_some_total_s=cpu_p.some.total_s if cpu_p else None,
            psi_io_some_total_s=io_p.some.total_s if io_p else None,
        )

    def _cpu_s(self, path: str) -> float | None:
        try:
            return self.tree.cpu_stat(path).usage_s
        except CgroupGone:
            raise
        except AgentcgError:    # no CPU accounting for this tree on this host: not measured
            return None
