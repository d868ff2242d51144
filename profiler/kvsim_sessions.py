"""Sessions as the KV simulator sees them, and the converter from agentcg traces.

A session is a sequence of turns: an LLM call (input and output tokens) followed by the
gap until the agent's next call, spent in tool calls. The gap after call i runs from the
call's end to the end of the last tool call that started after it (before call i+1); a
call followed by no tool call has a gap of 0 (the next call is sent at once). The
sandbox's memory during a turn is the largest sample between the call and the end of
its gap (0 when the trace has no samples).

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


@dataclass(frozen=True)
class SimTurn:
    input_tokens: int
    output_tokens: int
    tool: str | None        # the gap's longest tool call ("Bash:<first word>" for shell commands)
    tool_s: float           # gap after this call; 0 after the last one
    sandbox_bytes: int = 0


@dataclass(frozen=True)
class SimSession:
    session_id: str
    sandbox: str
    turns: tuple[SimTurn, ...]

    @property
    def mean_context_tokens(self) -> float:
        return sum(t.input_tokens for t in self.turns) / len(self.turns)

    @property
    def peak_sandbox_bytes(self) -> int:
        return max(t.sandbox_bytes for t in self.turns)


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
                    longest = mine[np.argmax(ends[mine] - starts[mine])]
                    tool = tkeys[longest]
                    gap = max(0.0, float(ends[mine].max() - times[i]))
                gap = min(gap, float(times[i + 1] - times[i]))
            lo = np.searchsorted(s_times, times[i] - 1.0)
            hi = np.searchsorted(s_times, times[i] + gap + 1.0)
            mem = int(s_mem[lo:hi].max()) if hi > lo else 0
            turns.append(SimTurn(max(1, int(ins[i])), max(1, int(outs[i])), tool, gap, mem))
        loaded.sessions.append(SimSession(str(sid), str(sandboxes.get(sid, sid)), tuple(turns)))
    if not loaded.sessions:
        raise InvalidInput(f"{source}: no session has LLM requests to simulate")
    return loaded
