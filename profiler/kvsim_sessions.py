"""Sessions as the KV simulator sees them, and the converter from agentcg traces.

A session is a sequence of turns: an LLM call (input and output tokens) followed by the
gap until the agent's next call, spent in tool calls. The gap after call i runs from the
call's end to the end of the last tool call that started after it (before call i+1); a
call followed by no tool call has a gap of 0 (the next call is sent at once). A gap is
labelled by its FIRST tool call (what the LLM's output names when the gap begins; the
longest call would peek at durations nobody knows yet).

The sandbox's memory follows its recorded samples (the importer's `samples` table, scope
sandbox): during a gap, the samples from the call's end over the gap, as steps at offsets
from the gap's start (a change under `MEMORY_STEP_BYTES` is not a step); during the next
LLM call, the last sample before that call. `sandbox_bytes` of a turn is the gap's peak.
A session's `peak_sandbox_bytes` and `mean_sandbox_bytes` (time-weighted) are over all its
samples: what an operator sizing a fixed host KV pool sees (0 when it has none).

Sessions without LLM requests are skipped and reported; tool calls without an end get
the median duration of the same tool in the trace (counted as `imputed_durations`).
Sub-agent (sidechain) calls are kept in the session's sequence, as the engine saw them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from agentcg.errors import InvalidInput, TraceError
from agentcg.policies.kv.predictor import tool_key

if TYPE_CHECKING:
    from agentcg.profiler.trace import Trace

TOOL_START_SLACK_S = 0.5   # a tool call starting this long before the LLM call's logged end belongs to it
MEMORY_STEP_BYTES = 32 << 20   # sandbox memory changes smaller than this are not simulated events
SAMPLE_SLACK_S = 1.0           # samples this far outside a gap (the sampling period) still describe it


@dataclass(frozen=True)
class SimTurn:
    input_tokens: int
    output_tokens: int
    tool: str | None        # the gap's first tool call ("Bash:<first word>" for shell commands)
    tool_s: float           # gap after this call; 0 after the last one
    sandbox_bytes: int = 0  # the sandbox's peak during the gap
    memory: tuple[tuple[float, int], ...] = ()   # (offset from the gap's start s, bytes) steps
    call_bytes: int | None = None                # the sandbox during the next LLM call (None: the gap's last)


@dataclass(frozen=True)
class SimSession:
    session_id: str
    sandbox: str
    turns: tuple[SimTurn, ...]
    peak_memory_bytes: int | None = None    # over the recorded samples; None: from the turns
    mean_memory_bytes: int | None = None    # time-weighted over the recorded samples

    @property
    def mean_context_tokens(self) -> float:
        return sum(t.input_tokens for t in self.turns) / len(self.turns)

    @property
    def peak_sandbox_bytes(self) -> int:
        if self.peak_memory_bytes is not None:
            return self.peak_memory_bytes
        return max(max(t.sandbox_bytes for t in self.turns), *(b for t in self.turns for _, b in t.memory), 0)

    @property
    def mean_sandbox_bytes(self) -> int:
        if self.mean_memory_bytes is not None:
            return self.mean_memory_bytes
        weights = [(t.tool_s, t.sandbox_bytes) for t in self.turns if t.tool_s > 0]
        total = sum(w for w, _ in weights)
        return int(sum(w * b for w, b in weights) / total) if total > 0 else self.peak_sandbox_bytes


def estimate_shared_prefix_tokens(sessions: list[SimSession], block_tokens: int = 16) -> int:
    """The system prompt the sessions of one agent share, estimated as the smallest first
    call's input (the agent's system prompt and tool definitions come first), in whole
    blocks; 0 for fewer than two sessions (nothing is shared)."""
    if len(sessions) < 2:
        return 0
    first = min(s.turns[0].input_tokens for s in sessions)
    return max(0, (first - 1) // block_tokens * block_tokens)


@dataclass
class LoadedSessions:
    sessions: list[SimSession]
    source: str
    imputed_durations: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)   # (session, reason)


def load_sessions(path: str | Path) -> LoadedSessions:
    """An agentcg trace (directory or .zip), or an AgentCgroup dataset folder."""
    path = Path(path)
    from agentcg.profiler.importers.agentcgroup import import_agentcgroup, looks_like_dataset

    if looks_like_dataset(path):     # any published layout (attempt_<n> folders, trace.jsonl, ...)
        result = import_agentcgroup(path)
        loaded = sessions_from_trace(result.trace, source=f"AgentCgroup dataset {path}")
        loaded.skipped += [(s.task, s.reason) for s in result.skipped]
        return loaded
    from agentcg.profiler.trace import read_trace

    return sessions_from_trace(read_trace(path), source=f"agentcg trace {path}")


def sessions_from_trace(trace: "Trace", source: str = "trace") -> LoadedSessions:
    import numpy as np

    llm = trace.llm_requests
    calls = trace.toolcalls
    if llm.empty:
        raise TraceError(f"{source}: the trace has no LLM requests; the KV simulator needs each "
                         f"session's LLM calls (input and output tokens)")
    durations = calls["end_wall_s"] - calls["start_wall_s"]
    keys = [tool_key(t, c) for t, c in zip(calls["tool"].fillna("unknown"), calls["command"].fillna(""))]
    calls = calls.assign(_key=keys, _dur=durations.astype("float64"))
    known = calls[calls["_dur"].notna() & (calls["_dur"] >= 0)]
    medians = known.groupby("_key")["_dur"].median().to_dict()
    overall = float(known["_dur"].median()) if len(known) else math.nan
    missing = calls["_dur"].isna() | (calls["_dur"] < 0)
    loaded = LoadedSessions([], source, imputed_durations=int(missing.sum()))
    if loaded.imputed_durations:
        fill = calls.loc[missing, "_key"].map(medians).fillna(overall)
        if fill.isna().any():
            raise TraceError(f"{source}: tool calls lack durations and no tool call in the trace has one to "
                             f"impute from; record end times (end_wall_s)")
        calls.loc[missing, "_dur"] = fill
    samples = trace.samples
    if len(samples):
        samples = samples[(samples["scope"] == "sandbox") & samples["memory_bytes"].notna()]
    sample_groups = {sid: g for sid, g in samples.groupby("session_id")} if len(samples) else {}
    call_groups = {sid: g for sid, g in calls.groupby("session_id")}
    sandboxes = dict(zip(trace.sessions["session_id"], trace.sessions["sandbox"].fillna(trace.sessions["session_id"])))
    llm_ids = set(llm["session_id"])
    for sid in trace.sessions["session_id"]:
        if sid not in llm_ids:
            loaded.skipped.append((str(sid), "no LLM requests in the trace"))
    for sid, group in llm.groupby("session_id", sort=True):
        group = group.sort_values("time_s")
        times = group["time_s"].to_numpy(dtype="float64")
        if np.isnan(times).any():
            loaded.skipped.append((str(sid), "an LLM request has no time"))
            continue
        ins = group["input_tokens"].fillna(0).to_numpy(dtype="int64")
        outs = group["output_tokens"].fillna(0).to_numpy(dtype="int64")
        tools = call_groups.get(sid)
        starts = tools["start_wall_s"].to_numpy(dtype="float64") if tools is not None else np.empty(0)
        ends = starts + tools["_dur"].to_numpy(dtype="float64") if tools is not None else np.empty(0)
        tkeys = list(tools["_key"]) if tools is not None else []
        owner = np.searchsorted(times, starts + TOOL_START_SLACK_S, side="right") - 1
        smp = sample_groups.get(sid)
        s_times = smp["time_s"].to_numpy(dtype="float64") if smp is not None else np.empty(0)
        s_mem = smp["memory_bytes"].to_numpy(dtype="float64") if smp is not None else np.empty(0)
        order = np.argsort(s_times)
        s_times, s_mem = s_times[order], s_mem[order]
        turns = []
        for i in range(len(times)):
            mine = np.flatnonzero(owner == i)
            gap, tool = 0.0, None
            if i + 1 < len(times):
                if mine.size:
                    tool = tkeys[mine[np.argmin(starts[mine])]]    # the first call: known when the gap begins
                    gap = max(0.0, float(ends[mine].max() - times[i]))
                gap = min(gap, float(times[i + 1] - times[i]))
            turns.append(_turn(ins[i], outs[i], tool, gap, times[i], times[i + 1] if i + 1 < len(times) else None,
                               s_times, s_mem))
        peak = int(s_mem.max()) if s_mem.size else 0
        mean = _time_weighted_mean(s_times, s_mem) if s_mem.size else 0
        loaded.sessions.append(SimSession(str(sid), str(sandboxes.get(sid, sid)), tuple(turns), peak, mean))
    if not loaded.sessions:
        raise InvalidInput(f"{source}: no session has LLM requests to simulate")
    return loaded


def _time_weighted_mean(times, values) -> int:
    if len(values) == 1:
        return int(values[0])
    dt = [b - a for a, b in zip(times[:-1], times[1:])]
    total = sum(dt)
    if total <= 0:
        return int(sum(values) / len(values))
    return int(sum(d * v for d, v in zip(dt, values[:-1])) / total)


def _turn(inp, out, tool, gap, start, next_start, s_times, s_mem) -> SimTurn:
    """One turn, with the sandbox's memory steps over its gap (offsets from the gap's start)."""
    import numpy as np

    lo = np.searchsorted(s_times, start - SAMPLE_SLACK_S)
    hi = np.searchsorted(s_times, start + gap + SAMPLE_SLACK_S)
    window = s_mem[lo:hi]
    peak_value = int(window.max()) if window.size else 0
    steps: list[tuple[float, int]] = []
    for t, b in zip(s_times[lo:hi], window):
        b = int(b)
        if not steps or abs(b - steps[-1][1]) >= MEMORY_STEP_BYTES or b == peak_value:
            offset = min(gap, max(0.0, float(t - start)))
            if steps and offset <= steps[-1][0]:
                steps[-1] = (steps[-1][0], max(steps[-1][1], b) if offset == 0.0 else b)
            else:
                steps.append((offset, b))
    peak = int(window.max()) if window.size else 0
    call_bytes = None
    if next_start is not None:
        k = np.searchsorted(s_times, next_start, side="right")
        if k > 0 and s_times[k - 1] >= start:
            call_bytes = int(s_mem[k - 1])
    return SimTurn(max(1, int(inp)), max(1, int(out)), tool, gap, peak, tuple(steps), call_bytes)
