"""Import the AgentCgroup dataset (one folder per task) into an agentcg trace.

Layout per task folder: `tool_calls.json` (UTC ISO timestamps with Z), `resources.json`
(podman stats about once a second: `epoch` is UTC seconds, `timestamp` is naive LOCAL
time and is not used), `meta.json` (naive local start/end, setup durations) and, for
most tasks, `llm_calls.json`. Every time in the trace is epoch seconds.

A task folder that is partial or malformed is skipped as a whole and reported with the
reason; nothing of it enters the trace. podman has no cgroup per tool call, so a call's
`peak_memory_bytes` is the container's peak over the samples taken while it ran (null
when no sample fell inside the call).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from agentcg.errors import InvalidInput, TraceError
from agentcg.profiler.trace import Trace, frame, toolcall_row
from agentcg.records import ToolCallRecord, truncate_command

DATASET_NAME = "agentcgroup-swe-local"
REQUIRED_FILES = ("tool_calls.json", "resources.json", "meta.json")
TZ_ROUND_S = 900          # time-zone offsets are whole quarter hours


@dataclass(frozen=True)
class SkippedTask:
    task: str
    reason: str


@dataclass
class ImportResult:
    trace: Trace
    tasks: int = 0
    tool_calls: int = 0
    llm_requests: int = 0
    samples: int = 0
    unmeasured_samples: int = 0           # podman printed "0B / 0B": the container was gone
    tasks_without_llm_log: int = 0
    skipped: list[SkippedTask] = field(default_factory=list)
    skipped_tool_calls: int = 0           # calls listed in skipped tasks (when countable)
    tool_counts: dict[str, int] = field(default_factory=dict)


class _BadTask(Exception):
    pass


def default_dataset_dir() -> Path:
    """$AGENTCG_DATASETS/agentcgroup-swe-local, else <repo>/../shared/datasets/..."""
    root = os.environ.get("AGENTCG_DATASETS")
    if root:
        return Path(root) / DATASET_NAME
    repo = Path(__file__).resolve().parents[2]
    return repo.parent / "shared" / "datasets" / DATASET_NAME


def import_agentcgroup(directory: str | Path) -> ImportResult:
    directory = Path(directory)
    if not directory.is_dir():
        raise InvalidInput(f"{directory}: not a directory; pass the dataset folder (one folder per task)")
    tasks = sorted(p for p in directory.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not tasks:
        raise InvalidInput(f"{directory}: holds no task folders")
    sessions, toolcalls, llm, samples = [], [], [], []
    result = ImportResult(trace=Trace.empty("agentcgroup"))
    for task_dir in tasks:
        try:
            task = _read_task(task_dir)
        except _BadTask as exc:
            result.skipped.append(SkippedTask(task_dir.name, str(exc)))
            result.skipped_tool_calls += _count_calls(task_dir)
            continue
        sessions.append(task["session"])
        toolcalls.extend(task["toolcalls"])
        llm.extend(task["llm"])
        samples.append(task["samples"])
        result.tasks += 1
        result.unmeasured_samples += task["unmeasured"]
        result.tasks_without_llm_log += not task["has_llm_log"]
    if not result.tasks:
        raise TraceError(f"{directory}: no task could be imported; first problem: "
                         f"{result.skipped[0].task}: {result.skipped[0].reason}")
    import pandas as pd

    trace = result.trace
    trace.sessions = frame("sessions", sessions)
    trace.toolcalls = frame("toolcalls", toolcalls)
    trace.llm_requests = frame("llm_requests", llm)
    trace.samples = pd.concat(samples, ignore_index=True)
    trace.notes = {"imported_from": str(directory), "dataset": DATASET_NAME,
                   "skipped": [vars(s) for s in result.skipped]}
    result.tool_calls, result.llm_requests = len(trace.toolcalls), len(trace.llm_requests)
    result.samples = len(trace.samples)
    result.tool_counts = {str(k): int(v) for k, v in trace.toolcalls["tool"].value_counts().items()}
    return result


def _count_calls(task_dir: Path) -> int:
    try:
        calls = json.loads((task_dir / "tool_calls.json").read_text())
        return len(calls) if isinstance(calls, list) else 0
    except (OSError, ValueError):
        return 0


def _load(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except OSError as exc:
        raise _BadTask(f"{path.name}: unreadable ({exc.strerror})") from None
    except ValueError as exc:
        raise _BadTask(f"{path.name}: broken JSON ({exc})") from None


def _utc(text: Any, what: str) -> float:
    if not isinstance(text, str):
        raise _BadTask(f"{what}: expected an ISO timestamp, got {text!r}")
    try:
        stamp = datetime.fromisoformat(text)
    except ValueError:
        raise _BadTask(f"{what}: not an ISO timestamp: {text!r}") from None
    if stamp.tzinfo is None:
        raise _BadTask(f"{what}: {text!r} has no time zone; expected UTC with Z")
    return stamp.timestamp()


def _naive_as_utc(text: Any) -> float | None:
    try:
        return datetime.fromisoformat(text).replace(tzinfo=timezone.utc).timestamp()
    except (TypeError, ValueError):
        return None


def _read_task(task_dir: Path) -> dict[str, Any]:
    import numpy as np

    missing = [name for name in REQUIRED_FILES if not (task_dir / name).is_file()]
    if missing:
        raise _BadTask(f"missing {', '.join(missing)}")
    meta = _load(task_dir / "meta.json")
    resources = _load(task_dir / "resources.json")
    calls = _load(task_dir / "tool_calls.json")
    has_llm_log = (task_dir / "llm_calls.json").is_file()
    llm_calls = _load(task_dir / "llm_calls.json") if has_llm_log else []
    if not isinstance(meta, dict):
        raise _BadTask("meta.json: expected a JSON object")
    raw_samples = resources.get("samples") if isinstance(resources, dict) else None
    if not isinstance(raw_samples, list) or not raw_samples:
        raise _BadTask("resources.json: no 'samples' list")
    if not isinstance(calls, list) or not isinstance(llm_calls, list):
        raise _BadTask("tool_calls.json and llm_calls.json must hold JSON lists")

    name = task_dir.name
    times, mem, limit, cpu = _parse_samples(raw_samples)
    records = [_parse_call(name, i, c) for i, c in enumerate(calls)]
    records.sort(key=lambda r: r.start_wall_s)
    starts = np.array([r.start_wall_s for r in records])
    ends = np.array([r.end_wall_s for r in records])
    # inside[i, j]: sample i was taken while call j ran
    inside = (starts[None, :] <= times[:, None]) & (times[:, None] <= ends[None, :])
    latest = np.full(len(times), -1)
    if records:   # the latest-started of the calls running at a sample's time
        latest = np.where(inside.any(axis=1), (inside * np.arange(1, len(records) + 1)).argmax(axis=1), -1)
    call_ids = np.array([r.call_id for r in records] + [None], dtype=object)
    measured = ~np.isnan(mem)
    for j, record in enumerate(records):
        peaks = mem[inside[:, j] & measured]
        record.peak_memory_bytes = int(peaks.max()) if peaks.size else None

    llm_rows = [_parse_llm(name, i, c) for i, c in enumerate(llm_calls)]
    edges = [times[0], times[-1]] + [t for r in records for t in (r.start_wall_s, r.end_wall_s)]
    edges += [row["time_s"] for row in llm_rows]
    start_s, end_s = float(min(edges)), float(max(edges))
    setup_s = _seconds(meta, "pull_time") + _seconds(meta, "permission_fix_time")
    total_s = meta.get("total_time")
    untraced_s = max(0.0, float(total_s) - setup_s - (end_s - start_s)) if _number(total_s) else None
    tz_offset = _tz_offset(raw_samples[0])
    meta_start = _naive_as_utc(meta.get("start_time"))
    models = [row["model"] for row in llm_rows if row["model"]]
    session = {
        "session_id": name, "sandbox": name, "source": "agentcgroup", "start_s": start_s,
        "end_s": end_s, "setup_s": setup_s, "untraced_s": untraced_s,
        "memory_limit_bytes": _optional_size(meta.get("memory_limit")),
        "cpu_limit_cores": float(meta["cpu_limit"]) if _number(meta.get("cpu_limit")) else None,
        "agent": "claude-code", "model": max(set(models), key=models.count) if models else meta.get("model"),
        "image": meta.get("image"),
        "metadata": json.dumps({**meta, "tz_offset_s": tz_offset, "llm_log": has_llm_log,
                                "meta_start_s": meta_start + tz_offset if meta_start and tz_offset is not None
                                else None}, sort_keys=True),
    }
    sample_frame = frame("samples", columns={
        "session_id": [name] * len(times), "sandbox": [name] * len(times),
        "scope": ["sandbox"] * len(times), "call_id": call_ids[latest], "time_s": times,
        "memory_bytes": [None if np.isnan(v) else int(v) for v in mem],
        "memory_limit_bytes": [None if np.isnan(v) else int(v) for v in limit], "cpu_cores": cpu,
    })
    return {"session": session, "toolcalls": [toolcall_row(name, r) for r in records], "llm": llm_rows,
            "samples": sample_frame, "unmeasured": int((~measured).sum()), "has_llm_log": has_llm_log}


def _parse_samples(raw: list[Any]) -> tuple[Any, Any, Any, Any]:
    import numpy as np

    from agentcg.units import parse_size

    n = len(raw)
    times, mem, limit, cpu = (np.full(n, np.nan) for _ in range(4))
    for i, sample in enumerate(raw):
        if not isinstance(sample, dict):
            raise _BadTask(f"resources.json: sample {i} is not an object")
        try:
            times[i] = float(sample["epoch"])
            used_text, _, limit_text = str(sample["mem_usage"]).partition("/")
            used = parse_size(used_text.strip(), what=f"resources.json sample {i} mem_usage")
            cap = parse_size(limit_text.strip(), what=f"resources.json sample {i} mem_usage limit")
            cpu_text = str(sample["cpu_percent"]).strip()
            cores = float(cpu_text.removesuffix("%")) / 100.0
        except KeyError as exc:
            raise _BadTask(f"resources.json: sample {i} lacks {exc}") from None
        except (InvalidInput, ValueError) as exc:
            raise _BadTask(str(exc) if isinstance(exc, InvalidInput)
                           else f"resources.json: sample {i}: {exc}") from None
        if cap == 0:          # "0B / 0B": podman had no container to measure
            continue
        mem[i], limit[i], cpu[i] = used, cap, cores
    if np.any(np.diff(times) < 0):
        raise _BadTask("resources.json: sample epochs go backwards")
    return times, mem, limit, cpu


def _parse_call(task: str, index: int, call: Any) -> ToolCallRecord:
    what = f"tool_calls.json call {index}"
    if not isinstance(call, dict):
        raise _BadTask(f"{what}: not an object")
    for key in ("id", "tool", "timestamp", "end_timestamp"):
        if not call.get(key):
            raise _BadTask(f"{what}: lacks {key!r}")
    start, end = _utc(call["timestamp"], what), _utc(call["end_timestamp"], what)
    if end < start:
        raise _BadTask(f"{what}: ends before it starts")
    tool_input = call.get("input") if isinstance(call.get("input"), dict) else {}
    command = tool_input.get("command") if call["tool"] == "Bash" else None
    command = command if isinstance(command, str) else json.dumps(tool_input, sort_keys=True)
    # no monotonic clock in the dataset: the wall clock stands in for it
    return ToolCallRecord(sandbox=task, call_id=str(call["id"]), tool=str(call["tool"]),
                          command=truncate_command(command), start_monotonic_s=start,
                          start_wall_s=start, end_monotonic_s=end, end_wall_s=end)


def _parse_llm(task: str, index: int, entry: Any) -> dict[str, Any]:
    what = f"llm_calls.json entry {index}"
    if not isinstance(entry, dict):
        raise _BadTask(f"{what}: not an object")
    tokens = {key: entry.get(key) for key in ("input_tokens", "output_tokens")}
    for key, value in tokens.items():
        if value is not None and (not isinstance(value, int) or value < 0):
            raise _BadTask(f"{what}: {key} must be a non-negative integer, got {value!r}")
    return {"session_id": task, "request_id": str(entry.get("id") or f"{task}-{index}"),
            "time_s": _utc(entry.get("timestamp"), what), "model": entry.get("model"),
            "is_sidechain": bool(entry.get("is_sidechain", False)), **tokens}


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _seconds(meta: dict[str, Any], key: str) -> float:
    value = meta.get(key, 0.0)
    if value is None:
        return 0.0
    if not _number(value) or value < 0:
        raise _BadTask(f"meta.json: {key} must be seconds, got {value!r}")
    return float(value)


def _optional_size(value: Any) -> int | None:
    if value in (None, ""):
        return None
    from agentcg.units import parse_size

    try:
        return parse_size(value if isinstance(value, (int, str)) else str(value), what="meta.json memory_limit")
    except InvalidInput as exc:
        raise _BadTask(str(exc)) from None


def _tz_offset(sample: dict[str, Any]) -> float | None:
    """Offset of the recording host's local time from UTC, from one sample's two clocks."""
    naive = _naive_as_utc(sample.get("timestamp"))
    if naive is None:
        return None
    return round((float(sample["epoch"]) - naive) / TZ_ROUND_S) * TZ_ROUND_S
