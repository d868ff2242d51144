"""Recorded sessions -> replay plans: what each tool-call and agent process must do.

Sources: an agentcg trace (directory or .zip) or an AgentCgroup dataset directory (one
folder per task, read through the importer; only the named tasks are imported).

Memory attribution. agentcg traces have per-call samples (`scope == "toolcall"`): a call
follows its own curve. AgentCgroup samples are the whole container (podman), labelled
with the call running at the time: a call's curve is the container's memory minus the
agent's level just before the call (the last sample with no call running); samples with
no call running form the agent's curve, held flat while a call runs. A call with no
sample inside it holds its recorded peak minus that level, or nothing.

Time. Offsets are recorded seconds from the session's first observation; a plan is
compressed by `speed`. A session may be cut to a window of its recording
(`ID=PRIORITY@FROM:TO`, recorded seconds): the calls that start inside it, the agent at
its level when the window opens; that is how bursts of different sessions are made to
overlap (bench/bench_replay.py aligns each session's largest call this way). CPU follows the recorded utilisation (cores) over the compressed
time, times `cpu_scale`: recorded CPU-seconds / speed * cpu_scale.
"""
from __future__ import annotations

import math
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from agentcg.errors import InvalidInput, TraceError
from agentcg.policies.sandbox.types import check_priority

if TYPE_CHECKING:
    import pandas as pd

    from agentcg.profiler.trace import Trace

MAX_SESSIONS = 16
MAX_CALLS_PER_SESSION = 2000
_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")

Step = tuple[float, int, float]          # (min_wall_s, target_bytes, cpu_s), compressed


@dataclass(frozen=True)
class CallPlan:
    index: int
    name: str                 # its cgroup's name (and call_id for the policy)
    record_id: str            # the call id in the trace
    tool: str
    start_s: float            # recorded offsets from the session start
    end_s: float
    steps: tuple[Step, ...]
    peak_bytes: int           # the most it will allocate
    wait_for: tuple[int, ...]  # earlier calls that ended before this one began

    @property
    def duration_s(self) -> float:
        return self.end_s - self.start_s


@dataclass(frozen=True)
class SessionPlan:
    session_id: str
    sandbox: str              # cgroup-safe name
    priority: str
    duration_s: float         # recorded
    agent_curve: tuple[tuple[float, int, float], ...]   # (offset_s, bytes, cores), change points
    calls: tuple[CallPlan, ...]
    recorded_peak_bytes: int
    speed: float

    def agent_at(self, offset_s: float) -> tuple[int, float]:
        level, cores = 0, 0.0
        for at_s, level_bytes, level_cores in self.agent_curve:
            if at_s > offset_s:
                break
            level, cores = level_bytes, level_cores
        return level, cores


@dataclass(frozen=True)
class SessionChoice:
    session_id: str
    priority: str = "normal"
    window: tuple[float, float] | None = None      # recorded seconds [from, to)


def parse_session_choice(text: str) -> SessionChoice:
    """'ID', 'ID=PRIORITY', either with '@FROM:TO' (a window, recorded seconds)."""
    text, _, window_text = text.partition("@")
    session_id, _, priority = text.partition("=")
    if not session_id:
        raise InvalidInput(f"--session {text!r}: expected ID[=PRIORITY][@FROM:TO], e.g. pydicom__pydicom-2065=high@300:360")
    window = None
    if window_text:
        low, sep, high = window_text.partition(":")
        try:
            window = (float(low), float(high))
        except ValueError:
            window = None
        if not sep or window is None or not (0 <= window[0] < window[1]) or not all(map(math.isfinite, window)):
            raise InvalidInput(f"--session {session_id}: window {window_text!r} must be FROM:TO in recorded seconds, "
                               "0 <= FROM < TO, e.g. @300:360")
    return SessionChoice(session_id, check_priority(priority or "normal"), window)


def load_trace(source: str | os.PathLike, session_ids: Sequence[str] = ()) -> "Trace":
    """An agentcg trace, or an AgentCgroup dataset directory (importing only `session_ids`)."""
    from agentcg.profiler.trace import MANIFEST, read_trace

    path = Path(source)
    if path.is_file() or (path / MANIFEST).is_file():
        return read_trace(path)
    if not path.is_dir():
        raise InvalidInput(f"{path}: no such trace or dataset directory")
    from agentcg.profiler.importers.agentcgroup import import_agentcgroup

    if not session_ids:
        return import_agentcgroup(path).trace
    missing = [s for s in session_ids if not (path / s).is_dir()]
    if missing:
        raise InvalidInput(f"{path}: no task folder for session(s) {', '.join(missing)}")
    with tempfile.TemporaryDirectory(prefix="agentcg-replay-") as tmp:
        for session_id in session_ids:
            os.symlink((path / session_id).resolve(), Path(tmp) / session_id)
        result = import_agentcgroup(tmp)
    if result.skipped:
        first = result.skipped[0]
        raise TraceError(f"{path}: task {first.task} could not be imported: {first.reason}")
    return result.trace


def plan_sessions(trace: "Trace", choices: Sequence[SessionChoice], *, speed: float, cpu_scale: float = 1.0,
                  mem_scale: float = 1.0) -> list[SessionPlan]:
    if not choices:
        raise InvalidInput("name at least one session to replay (--session ID[=PRIORITY])")
    if len(choices) > MAX_SESSIONS:
        raise InvalidInput(f"at most {MAX_SESSIONS} sessions per replay, got {len(choices)}")
    for name, value in (("speed", speed), ("cpu scale", cpu_scale), ("memory scale", mem_scale)):
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
            raise InvalidInput(f"{name} must be a positive number, got {value!r}")
    known = set(trace.sessions["session_id"].astype(str))
    ids = [c.session_id for c in choices]
    if len(set(ids)) != len(ids):
        raise InvalidInput(f"a session is named twice in {', '.join(ids)}")
    unknown = [s for s in ids if s not in known]
    if unknown:
        raise InvalidInput(f"session(s) {', '.join(unknown)} are not in the trace; it has {len(known)} "
                           f"(first: {', '.join(sorted(known)[:3])})")
    sandboxes: set[str] = set()
    plans = []
    for choice in choices:
        sandbox = _safe_name(choice.session_id, sandboxes)
        sandboxes.add(sandbox)
        plans.append(_plan(trace, choice, sandbox, speed, cpu_scale, mem_scale))
    return plans


def _safe_name(session_id: str, taken: set[str]) -> str:
    base = _UNSAFE.sub("_", session_id)[:56].strip(".") or "session"
    name, n = base, 1
    while name in taken or name in ("agent", "tools"):
        n += 1
        name = f"{base}-{n}"
    return name


def _plan(trace: "Trace", choice: SessionChoice, sandbox: str, speed: float, cpu_scale: float,
          mem_scale: float) -> SessionPlan:
    import numpy as np

    sid = choice.session_id
    calls = trace.toolcalls[trace.toolcalls["session_id"] == sid].sort_values("start_wall_s", kind="stable")
    if len(calls) > MAX_CALLS_PER_SESSION:
        raise InvalidInput(f"session {sid}: {len(calls)} tool calls, more than {MAX_CALLS_PER_SESSION} per session")
    samples = trace.samples[(trace.samples["session_id"] == sid) & trace.samples["memory_bytes"].notna()]
    samples = samples.sort_values("time_s", kind="stable")
    box = samples[samples["scope"] == "sandbox"]
    own = samples[samples["scope"] == "toolcall"]
    session = trace.sessions[trace.sessions["session_id"] == sid].iloc[0]
    t0 = _first(session["start_s"], box["time_s"].min() if len(box) else None,
                calls["start_wall_s"].min() if len(calls) else None)
    end = _first(session["end_s"], box["time_s"].max() if len(box) else None, t0)
    if t0 is None:
        raise TraceError(f"session {sid}: no start time, samples or tool calls to replay")
    if choice.window is not None:
        if t0 + choice.window[0] >= end:
            raise InvalidInput(f"session {sid}: window {choice.window[0]:g}:{choice.window[1]:g} s starts after its "
                               f"end ({end - t0:.0f} s)")
        end = min(end, t0 + choice.window[1])
        t0 += choice.window[0]
        box = box[box["time_s"] <= end]
        keep = calls["start_wall_s"].to_numpy(dtype=float) >= t0
        keep &= calls["start_wall_s"].to_numpy(dtype=float) < end
        calls = calls[keep]

    times = box["time_s"].to_numpy(dtype=float) - t0
    mem = box["memory_bytes"].to_numpy(dtype=float) * mem_scale
    cores = box["cpu_cores"].astype("float64").fillna(0.0).to_numpy(dtype=float)
    idle = box["call_id"].isna().to_numpy()
    box_calls = box["call_id"].astype(object).fillna("").to_numpy()
    agent_curve: list[tuple[float, int, float]] = []
    level, level_cores = 0, 0.0
    for t, m, c, is_idle in zip(times, mem, cores, idle):
        if is_idle:
            level, level_cores = int(m), float(c) * cpu_scale
        else:
            level_cores = 0.0
        if not agent_curve or agent_curve[-1][1:] != (level, level_cores):
            agent_curve.append((max(0.0, float(t)), level, level_cores))

    plans = []
    starts = (calls["start_wall_s"].to_numpy(dtype=float) - t0)
    ends = (calls["end_wall_s"].astype("float64").fillna(calls["start_wall_s"].astype("float64"))
            .to_numpy(dtype=float) - t0)
    for index, (record_id, tool, peak) in enumerate(zip(calls["call_id"].astype(str), calls["tool"].astype(str),
                                                        calls["peak_memory_bytes"])):
        start_s, end_s = float(starts[index]), max(float(starts[index]), float(ends[index]))
        mine = own[own["call_id"] == record_id]
        if len(mine):
            at = mine["time_s"].to_numpy(dtype=float) - t0
            target = mine["memory_bytes"].to_numpy(dtype=float) * mem_scale
            use = mine["cpu_cores"].astype("float64").fillna(0.0).to_numpy(dtype=float)
        else:
            inside = (box_calls == record_id) & (times >= start_s) & (times <= end_s)
            base = _agent_level_before(times, mem, idle, start_s)
            at, target, use = times[inside], np.maximum(mem[inside] - base, 0.0), cores[inside]
            if not len(at) and peak is not None and not _isna(peak):
                at, target, use = np.array([start_s]), np.array([max(0.0, float(peak) * mem_scale - base)]), \
                    np.array([0.0])
        steps = _steps(start_s, end_s, at, target, use, speed, cpu_scale)
        wait_for = tuple(i for i in range(index) if ends[i] <= start_s)
        plans.append(CallPlan(index, f"c{index:04d}", record_id, tool, start_s, end_s, steps,
                              max((s[1] for s in steps), default=0), wait_for))
    recorded_peak = int(np.nanmax(mem)) if len(mem) else 0
    return SessionPlan(sid, sandbox, choice.priority, max(0.0, float(end - t0)), tuple(agent_curve),
                       tuple(plans), recorded_peak, float(speed))


def _steps(start_s: float, end_s: float, at, target, cores, speed: float, cpu_scale: float) -> tuple[Step, ...]:
    if not len(at):
        return ((max(0.0, end_s - start_s) / speed, 0, 0.0),)
    points = [start_s] + [float(t) for t in at[1:]] + [end_s]
    steps = []
    for k in range(len(at)):
        dt = max(0.0, points[k + 1] - points[k]) / speed
        steps.append((dt, int(target[k]), float(cores[k]) * dt * cpu_scale))
    return tuple(steps)


def _agent_level_before(times, mem, idle, start_s: float) -> float:
    before = idle & (times <= start_s)
    if before.any():
        return float(mem[before][-1])
    if idle.any():
        return float(mem[idle][0])
    return 0.0


def _first(*values):
    for value in values:
        if value is not None and not _isna(value):
            return float(value)
    return None


def _isna(value) -> bool:
    import pandas as pd

    return bool(pd.isna(value))
