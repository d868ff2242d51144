"""Fixtures for the profiler tests: the shared AgentCgroup dataset (read in place,
tests skip without it), small copies of it in tmp to corrupt, and a synthetic trace
whose figures are known by hand."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from agentcg.profiler.importers.agentcgroup import default_dataset_dir
from agentcg.profiler.trace import EVENT_OOM_KILL, EVENT_POLICY_ACTION, Trace, frame, toolcall_row
from agentcg.records import ToolCallRecord

SMALL_TASKS = ("python-control__python-control-525", "Azure__azure-cli-4265", "ARMmbed__mbed-tools-259")
MB = 1000**2


@pytest.fixture(scope="session")
def dataset_dir() -> Path:
    path = default_dataset_dir()
    if not (path / SMALL_TASKS[0]).is_dir():
        pytest.skip(f"AgentCgroup dataset not found at {path} (set AGENTCG_DATASETS)")
    return path


@pytest.fixture
def small_dataset(dataset_dir: Path, tmp_path: Path) -> Path:
    """Three real task folders copied into tmp, free to corrupt."""
    out = tmp_path / "dataset"
    for task in SMALL_TASKS:
        shutil.copytree(dataset_dir / task, out / task)
    return out


def call(call_id: str, tool: str, start: float, end: float, **kw) -> ToolCallRecord:
    return ToolCallRecord(sandbox="s1", call_id=call_id, tool=tool, command=tool.lower(),
                          start_monotonic_s=start, start_wall_s=start, end_monotonic_s=end,
                          end_wall_s=end, **kw)


@pytest.fixture
def synthetic_trace() -> Trace:
    """One session, 1000..1100 s, memory 100 MB with bursts to 600 MB at 1015-1017 (inside
    call A) and to 500 MB at 1060-1061 (no call running)."""
    trace = Trace.empty("test")
    trace.sessions = frame("sessions", [{"session_id": "s1", "sandbox": "s1", "source": "test",
                                         "start_s": 1000.0, "end_s": 1100.0, "setup_s": 10.0,
                                         "untraced_s": 5.0}])
    calls = [call("A", "Bash", 1010, 1030, peak_memory_bytes=600 * MB),
             call("B", "Read", 1020, 1040, peak_memory_bytes=100 * MB, oom_killed=True),
             call("C", "Bash", 1090, 1100, peak_memory_bytes=200 * MB, oom_killed=True)]
    trace.toolcalls = frame("toolcalls", [toolcall_row("s1", c) for c in calls])
    memory = {t: 100 * MB for t in range(1000, 1101)}
    memory.update({1015: 600 * MB, 1016: 600 * MB, 1017: 600 * MB, 1060: 500 * MB, 1061: 500 * MB})
    trace.samples = frame("samples", [{"session_id": "s1", "sandbox": "s1", "scope": "sandbox",
                                       "time_s": float(t), "memory_bytes": m} for t, m in memory.items()])
    trace.llm_requests = frame("llm_requests", [
        {"session_id": "s1", "request_id": f"r{i}", "time_s": 1000.0 + i, "model": "m",
         "input_tokens": 1000, "output_tokens": 10} for i in range(3)])
    trace.events = frame("events", [
        {"session_id": "s1", "time_s": 1100.0, "kind": EVENT_OOM_KILL, "call_id": "C"},
        {"session_id": "s1", "time_s": 1050.0, "kind": EVENT_POLICY_ACTION, "action": "freeze"},
        {"session_id": "s1", "time_s": 1051.0, "kind": EVENT_POLICY_ACTION, "action": "freeze"},
        {"session_id": "s1", "time_s": 1052.0, "kind": EVENT_POLICY_ACTION, "action": "kill"},
        {"session_id": "s1", "time_s": 1053.0, "kind": "kv_decision", "action": "offload"}])
    return trace
