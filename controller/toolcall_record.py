"""A finished tool call's record: read from the kernel's per-cgroup accounting (and the eBPF
monitor's counters where it watches the call), and appended to the records file."""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agentcg.controller.cgroup import CgroupTree
from agentcg.errors import AgentcgError, CgroupGone
from agentcg.records import ToolCallRecord

if TYPE_CHECKING:
    from agentcg.bpf.monitor import BpfMonitor, CgroupCounters


def read_record(tree: CgroupTree, monitor: "BpfMonitor | None", call: Any) -> ToolCallRecord:
    """`call` (a toolcall.ToolCall, which imports this module)'s record: what it was and when, and what the kernel counted for it (its
    cgroup's counters; the eBPF counters when a monitor watches it, else None)."""
    end_mono = call.returned_monotonic_s if call.returned_monotonic_s is not None else time.monotonic()
    end_wall = call.returned_wall_s if call.returned_wall_s is not None else time.time()
    record = ToolCallRecord(
        sandbox=call.sandbox, call_id=call.call_id, tool=call.tool, command=call.command,
        start_monotonic_s=call.start_monotonic_s, start_wall_s=call.start_wall_s,
        end_monotonic_s=end_mono, end_wall_s=end_wall, exit_code=call.exit_code, signal=call.signal,
        priority=call.priority, mem_hint_bytes=call.mem_hint_bytes, extra=dict(call.extra),
    )
    if not call.measured:
        record.message = "exited before agentcg could move it into its own cgroup; its usage stays with the agent's"
        if monitor is not None:
            monitor.forget(call.cgroup_id)
        return record
    try:
        record.peak_memory_bytes = tree.memory_peak(call.path) if "memory.peak" in tree.capabilities else None
        record.cpu_s = tree.cpu_stat(call.path).usage_s
        if "memory.max" in tree.capabilities:
            events = tree.memory_events(call.path)
            record.oom_killed = events.oom_kill > 0
            record.page_faults = tree.memory_stat(call.path).pgfault
    except CgroupGone:
        pass
    except AgentcgError as exc:  # a controller the host lacks: leave the field unmeasured
        record.extra["cgroup_read_error"] = str(exc)
    if monitor is not None:
        try:
            _apply_counters(record, monitor.forget(call.cgroup_id))
        except AgentcgError as exc:
            record.extra["ebpf_read_error"] = str(exc)
    return record


def append_record(path: Path, record: ToolCallRecord, mode: int, gid: int | None) -> None:
    from agentcg.safefile import open_append

    path.parent.mkdir(parents=True, exist_ok=True)
    line = (record.to_json() + "\n").encode()
    # one write(2) on O_APPEND: concurrent writers' lines do not interleave. Mode 0600 by
    # default: command lines may hold secrets (`--token=...`); never through a link
    fd = open_append(path, mode, gid)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


def _apply_counters(record: ToolCallRecord, c: "CgroupCounters") -> None:
    record.peak_rss_bytes = c.rss_peak_bytes
    record.runq_latency_p50_s = c.runq_latency_p50_s
    record.runq_latency_p99_s = c.runq_latency_p99_s
    record.reclaim_stall_s = c.reclaim_s
    record.block_read_bytes = c.block_read_bytes
    record.block_write_bytes = c.block_write_bytes
    if c.page_faults is not None:
        record.page_faults = c.page_faults     # user faults; the cgroup's pgfault counts kernel ones too
    if c.forks is not None:
        record.processes = c.forks + 1         # forks inside the call plus the process that started it
    if c.oom_kills:
        record.oom_killed = True
    if record.cpu_s is None:
        record.cpu_s = c.cpu_s
