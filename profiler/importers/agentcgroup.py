"""Import AgentCgroup sessions (eunomia-bpf/agentcgroup, as published or as our reshaped
copy) into an agentcg trace.

    result = import_agentcgroup(Path("experiments/all_images_local"), attempt=None)
    for task in result.reports: print(task.line())      # what each session gave
    print(result.summary_line())

Layouts: see agentcgroup_layout (task folders, `attempt_<n>` subfolders, sets of tasks).
Per session folder, each table comes from the first file that has it:
- session metadata: `meta.json`, else the scalar fields of `results.json`, else none;
- tool calls: `tool_calls.json`, else `results.json` traces.tool_calls, else the
  `tool_use` blocks of `trace.jsonl`; a call without `end_timestamp` ends at its
  `tool_result` in trace.jsonl (same tool_use_id), else its end is unknown (null);
- LLM requests: `llm_calls.json`, else the assistant lines of `trace.jsonl`
  (deduplicated by message id; token semantics in agentcgroup_llm);
- samples: `resources.json`, else `results.json` resource_samples (podman stats; `epoch`
  is UTC seconds, `timestamp` naive LOCAL time and only used to find the zone offset).
Every time in the trace is epoch seconds. A session folder that is partial or malformed
is skipped as a whole and reported with the reason; nothing of it enters the trace.
podman has no cgroup per tool call, so a call's `peak_memory_bytes` is the container's
peak over the samples taken while it ran (null when no sample fell inside the call).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agentcg.errors import InvalidInput, TraceError
from agentcg.profiler.importers import agentcgroup_files as files
from agentcg.profiler.importers.agentcgroup_files import BadTask
from agentcg.profiler.importers.agentcgroup_layout import SESSION_FILES, SessionDir, discover
from agentcg.profiler.importers.agentcgroup_llm import implausible_turns, parse_llm_calls, read_session_log
from agentcg.profiler.trace import Trace, frame, toolcall_row

DATASET_NAME = "agentcgroup-swe-local"


@dataclass(frozen=True)
class SkippedTask:
    task: str          # the task (or task/attempt_<n>) that yielded nothing
    reason: str


@dataclass
class SessionImport:
    """What one session folder gave: counts, the file each table came from, what was
    left out inside it and what looks wrong."""

    session_id: str
    tool_calls: int
    llm_requests: int
    samples: int
    sources: dict[str, str | None]
    ends_from_log: int = 0            # tool-call end times taken from trace.jsonl tool results
    ends_unknown: int = 0             # calls with no end anywhere: kept, end null
    usage_formats: tuple[str, ...] = ()
    skipped: list[str] = field(default_factory=list)
    flags: list[str] = field(default_factory=list)

    def line(self) -> str:
        src = lambda key: self.sources.get(key) or "none"
        parts = [f"{self.tool_calls} tool calls ({src('tool calls')}"
                 + (f", {self.ends_from_log} end times from trace.jsonl" if self.ends_from_log else "")
                 + (f", {self.ends_unknown} without an end time" if self.ends_unknown else "") + ")",
                 f"{self.llm_requests} LLM requests ({src('llm')}"
                 + (f", usage {'/'.join(self.usage_formats)}" if self.usage_formats else "") + ")",
                 f"{self.samples} samples ({src('samples')})", f"metadata {src('metadata')}"]
        return f"imported {self.session_id}: " + ", ".join(parts)


@dataclass
class ImportResult:
    trace: Trace
    tasks: int = 0                        # sessions imported
    tool_calls: int = 0
    llm_requests: int = 0
    samples: int = 0
    unmeasured_samples: int = 0           # podman printed "0B / 0B": the container was gone
    tasks_without_llm_log: int = 0
    skipped: list[SkippedTask] = field(default_factory=list)
    skipped_tool_calls: int = 0           # calls listed in skipped sessions (when countable)
    tool_counts: dict[str, int] = field(default_factory=dict)
    reports: list[SessionImport] = field(default_factory=list)

    @property
    def skipped_items(self) -> int:
        return sum(len(r.skipped) for r in self.reports)

    @property
    def flags(self) -> list[str]:
        return [f"{r.session_id}: {flag}" for r in self.reports for flag in r.flags]

    def summary_line(self) -> str:
        return (f"summary: {self.tasks} sessions, {self.tool_calls} tool calls, {self.llm_requests} LLM requests, "
                f"{self.samples} samples; skipped {len(self.skipped)} task(s) and {self.skipped_items} "
                f"entries inside imported ones; {len(self.flags)} implausible value(s) flagged")


def default_dataset_dir() -> Path:
    """$AGENTCG_DATASETS/agentcgroup-swe-local, else <repo>/../shared/datasets/..."""
    root = os.environ.get("AGENTCG_DATASETS")
    if root:
        return Path(root) / DATASET_NAME
    repo = Path(__file__).resolve().parents[2]
    return repo.parent / "shared" / "datasets" / DATASET_NAME


def looks_like_dataset(path: Path) -> bool:
    """True for a folder this importer reads (rather than an agentcg trace)."""
    return path.is_dir() and not (path / "trace.json").exists() and bool(discover(path))


def import_agentcgroup(directory: str | Path, attempt: int | None = None) -> ImportResult:
    directory = Path(directory)
    if not directory.is_dir():
        raise InvalidInput(f"{directory}: not a directory; pass the dataset folder (one folder per task)")
    if attempt is not None and attempt < 0:
        raise InvalidInput(f"--attempt must be a non-negative number, got {attempt}")
    tasks = discover(directory, attempt)
    if not tasks:
        raise InvalidInput(f"{directory}: holds no task folders")
    sessions, toolcalls, llm, samples = [], [], [], []
    result = ImportResult(trace=Trace.empty("agentcgroup"))
    for task in tasks:
        if task.problem:
            result.skipped.append(SkippedTask(task.task, task.problem))
        for sdir in task.sessions:
            try:
                got = _read_session(sdir)
            except BadTask as exc:
                result.skipped.append(SkippedTask(sdir.session_id, str(exc)))
                result.skipped_tool_calls += _count_calls(sdir.path)
                continue
            sessions.append(got["session"])
            toolcalls.extend(got["toolcalls"])
            llm.extend(got["llm"])
            samples.append(got["samples"])
            result.reports.append(got["report"])
            result.tasks += 1
            result.unmeasured_samples += got["unmeasured"]
            result.tasks_without_llm_log += got["report"].sources.get("llm") is None
    if not result.tasks:
        raise TraceError(f"{directory}: no task could be imported; first problem: "
                         f"{result.skipped[0].task}: {result.skipped[0].reason}")
    import pandas as pd

    trace = result.trace
    trace.sessions = frame("sessions", sessions)
    trace.toolcalls = frame("toolcalls", toolcalls)
    trace.llm_requests = frame("llm_requests", llm)
    trace.samples = pd.concat(samples, ignore_index=True)
    trace.notes = {"imported_from": str(directory), "dataset": directory.name, "attempt": attempt,
                   "skipped": [vars(s) for s in result.skipped], "flags": result.flags[:1000]}
    result.tool_calls, result.llm_requests = len(trace.toolcalls), len(trace.llm_requests)
    result.samples = len(trace.samples)
    result.tool_counts = {str(k): int(v) for k, v in trace.toolcalls["tool"].value_counts().items()}
    return result


def _count_calls(path: Path) -> int:
    try:
        calls = json.loads((path / "tool_calls.json").read_text())
        return len(calls) if isinstance(calls, list) else 0
    except (OSError, ValueError):
        return 0


def _optional_json(path: Path, expect: type) -> Any:
    if not path.is_file():
        return None
    value = files.load_json(path)
    if not isinstance(value, expect):
        raise BadTask(f"{path.name}: expected a JSON {'object' if expect is dict else 'list'}, "
                      f"got {type(value).__name__}; is it an AgentCgroup file?")
    return value


def _read_session(sdir: SessionDir) -> dict[str, Any]:
    import numpy as np

    path, name = sdir.path, sdir.session_id
    if not any((path / f).is_file() for f in SESSION_FILES):
        raise BadTask("holds none of " + ", ".join(SESSION_FILES))
    results = _optional_json(path / "results.json", dict)
    meta = _optional_json(path / "meta.json", dict)
    sources: dict[str, str | None] = {"metadata": "meta.json" if meta is not None else None}
    if meta is None and results is not None:
        meta, sources["metadata"] = {k: v for k, v in results.items() if not isinstance(v, (dict, list))}, \
            "results.json"
    meta = meta or {}
    log = read_session_log(name, path / "trace.jsonl") if (path / "trace.jsonl").is_file() else None
    traced = results.get("traces") if results is not None else None

    calls = _optional_json(path / "tool_calls.json", list)
    sources["tool calls"] = "tool_calls.json" if calls is not None else None
    if calls is None and isinstance(traced, dict) and isinstance(traced.get("tool_calls"), list):
        calls, sources["tool calls"] = traced["tool_calls"], "results.json"
    if calls is None and log is not None and log.tool_uses:
        calls, sources["tool calls"] = log.tool_uses, "trace.jsonl"
    resources = _optional_json(path / "resources.json", dict)
    sources["samples"] = "resources.json" if resources is not None else None
    if resources is None and results is not None and isinstance(results.get("resource_samples"), dict):
        resources, sources["samples"] = results["resource_samples"], "results.json"
    raw_samples = resources.get("samples", []) if resources is not None else []
    if not isinstance(raw_samples, list):
        raise BadTask(f"{sources['samples']}: 'samples' is not a list")
    llm_calls = _optional_json(path / "llm_calls.json", list)
    if llm_calls is not None:
        llm_rows, sources["llm"] = parse_llm_calls(name, llm_calls), "llm_calls.json"
    elif log is not None:
        llm_rows, sources["llm"] = log.requests, "trace.jsonl"
    else:
        llm_rows, sources["llm"] = [], None

    result_times = log.result_times if log is not None else {}
    where = sources["tool calls"] or "tool_calls.json"
    records = [files.parse_call(name, i, c, where, result_times) for i, c in enumerate(calls or [])]
    records.sort(key=lambda r: r.start_wall_s)
    report = SessionImport(
        session_id=name, tool_calls=len(records), llm_requests=len(llm_rows), samples=len(raw_samples),
        sources=sources, ends_from_log=sum(1 for c in calls or [] if isinstance(c, dict)
                                           and not c.get("end_timestamp") and str(c.get("id")) in result_times),
        ends_unknown=sum(r.end_wall_s is None for r in records),
        usage_formats=tuple(sorted({r["usage_format"] for r in llm_rows if r.get("usage_format")})),
        skipped=list(log.skipped) if log is not None else [], flags=implausible_turns(llm_rows))
    if not records and not llm_rows and not raw_samples:
        raise BadTask("nothing to import: no tool calls, LLM requests or resource samples in "
                      + ", ".join(f for f in SESSION_FILES if (path / f).is_file()))

    times, mem, limit, cpu = files.parse_samples(raw_samples, sources["samples"] or "resources.json")
    starts = np.array([r.start_wall_s for r in records], dtype="float64")
    ends = np.array([np.nan if r.end_wall_s is None else r.end_wall_s for r in records], dtype="float64")
    # inside[i, j]: sample i was taken while call j ran (an unknown end contains nothing)
    inside = (starts[None, :] <= times[:, None]) & (times[:, None] <= ends[None, :])
    latest = np.full(len(times), -1)
    if records and len(times):   # the latest-started of the calls running at a sample's time
        latest = np.where(inside.any(axis=1), (inside * np.arange(1, len(records) + 1)).argmax(axis=1), -1)
    call_ids = np.array([r.call_id for r in records] + [None], dtype=object)
    measured = ~np.isnan(mem)
    for j, record in enumerate(records):
        peaks = mem[inside[:, j] & measured]
        record.peak_memory_bytes = int(peaks.max()) if peaks.size else None

    edges = [float(t) for t in times[[0, -1]]] if len(times) else []
    edges += [t for r in records for t in (r.start_wall_s, r.end_wall_s) if t is not None]
    edges += [row["time_s"] for row in llm_rows]
    start_s, end_s = float(min(edges)), float(max(edges))
    where_meta = sources["metadata"] or "meta.json"
    setup_s = files.seconds(meta, "pull_time", where_meta) + files.seconds(meta, "permission_fix_time", where_meta) \
        if sources["metadata"] else None     # no metadata at all: the set-up time is not known
    total_s = meta.get("total_time")
    untraced_s = max(0.0, float(total_s) - (setup_s or 0.0) - (end_s - start_s)) if files.is_number(total_s) else None
    tz_offset = files.tz_offset(raw_samples[0]) if raw_samples else None
    meta_start = files.naive_as_utc(meta.get("start_time"))
    models = [row["model"] for row in llm_rows if row["model"]]
    session = {
        "session_id": name, "sandbox": sdir.task, "source": "agentcgroup", "start_s": start_s,
        "end_s": end_s, "setup_s": setup_s, "untraced_s": untraced_s,
        "memory_limit_bytes": files.optional_size(meta.get("memory_limit"), where_meta),
        "cpu_limit_cores": files.optional_cores(meta.get("cpu_limit"), where_meta),
        "agent": "claude-code", "model": max(set(models), key=models.count) if models else meta.get("model"),
        "image": meta.get("image"),
        "metadata": json.dumps({**meta, "task": sdir.task, "attempt": sdir.attempt, "tz_offset_s": tz_offset,
                                "llm_log": sources["llm"] is not None, "sources": sources,
                                "usage_formats": list(report.usage_formats),
                                "meta_start_s": meta_start + tz_offset if meta_start and tz_offset is not None
                                else None}, sort_keys=True, default=str),
    }
    sample_frame = frame("samples", columns={
        "session_id": [name] * len(times), "sandbox": [sdir.task] * len(times),
        "scope": ["sandbox"] * len(times), "call_id": call_ids[latest], "time_s": times,
        "memory_bytes": [None if np.isnan(v) else int(v) for v in mem],
        "memory_limit_bytes": [None if np.isnan(v) else int(v) for v in limit], "cpu_cores": cpu,
    })
    return {"session": session, "toolcalls": [toolcall_row(name, r) for r in records], "llm": llm_rows,
            "samples": sample_frame, "unmeasured": int((~measured).sum()), "report": report}
