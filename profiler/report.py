"""The characterisation of recorded sessions: pure functions from a trace's tables to
typed results, then a text or JSON rendering.

Definitions (docs/profiling.md explains them for users):
- wall time: `setup_s` (before the first observation), traced time (first to last
  observation) split into tool time (the union of tool-call intervals) and agent time
  (the rest: the agent and its LLM requests), and `untraced_s` (known but not observed).
- a memory burst: a run of samples whose memory is at least `burst_threshold_bytes`
  above the lowest sample of the preceding `burst_window_s`; it is inside a tool call
  when its rise (from that lowest sample to the run's peak) overlaps a tool call.
- static-limit waste: a limit set at the session's peak memory for the whole traced
  time, minus the memory used: the integral of (peak - used) over time, in GB*s.
- LLM context growth: the context (`input_tokens`) of the main conversation's requests
  (not sub-agents', `is_sidechain`) in time order: first, last, largest, and the median
  change from one turn to the next.
- cached vs uncached input: over the requests whose source says (cache columns not
  null), cached = `cache_read_tokens`, uncached = `input_tokens - cache_read_tokens`;
  the input of requests whose source does not say is counted as unknown, never as either.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from agentcg.errors import TraceError
from agentcg.profiler.trace import EVENT_OOM_KILL, EVENT_POLICY_ACTION, TABLES, Trace

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd

DEFAULT_BURST_THRESHOLD_BYTES = 300 * 1000**2     # 300 MB, decimal like podman and the study
DEFAULT_BURST_WINDOW_S = 10.0
MB, GB = 1000**2, 1000**3


@dataclass(frozen=True)
class WallSplit:
    setup_s: float
    tool_s: float
    agent_s: float
    untraced_s: float | None

    @property
    def traced_s(self) -> float:
        return self.tool_s + self.agent_s

    @property
    def total_s(self) -> float:
        return self.setup_s + self.traced_s + (self.untraced_s or 0.0)


@dataclass(frozen=True)
class ToolStats:
    tool: str
    count: int
    duration_p50_s: float | None
    duration_p95_s: float | None
    peak_memory_measured: int                  # calls with a peak (a sample inside the call)
    peak_memory_p50_bytes: int | None
    peak_memory_p95_bytes: int | None


@dataclass(frozen=True)
class Burst:
    rise_start_s: float
    peak_s: float
    rise_bytes: int
    in_tool_call: bool


@dataclass(frozen=True)
class MemoryStats:
    samples: int
    peak_bytes: int
    mean_bytes: float
    peak_to_mean: float | None
    bursts: int
    bursts_in_tool_calls: int
    used_gb_s: float
    static_waste_gb_s: float                   # limit at peak, minus used, over traced time


@dataclass(frozen=True)
class LlmStats:
    requests: int
    context_first_tokens: int | None           # main conversation, first request
    context_last_tokens: int | None
    context_max_tokens: int | None             # any request, sub-agents included
    context_growth_p50_tokens: float | None    # median turn-to-turn change of the main conversation
    input_tokens: int
    cached_input_tokens: int | None            # None: no request said how much came from a cache
    uncached_input_tokens: int | None
    unknown_cache_input_tokens: int            # input of requests whose source had no cache figures

    @property
    def cached_share(self) -> float | None:
        known = (self.cached_input_tokens or 0) + (self.uncached_input_tokens or 0)
        return (self.cached_input_tokens or 0) / known if self.cached_input_tokens is not None and known else None


@dataclass(frozen=True)
class SessionReport:
    session_id: str
    source: str
    wall: WallSplit
    tool_calls: int
    llm_requests: int
    input_tokens: int
    output_tokens: int
    memory: MemoryStats | None                 # None: no memory samples in the trace
    tools: list[ToolStats]
    oom_kills: int
    policy_actions: dict[str, int]
    llm: LlmStats | None = None                # None: no LLM requests
    events: dict[str, int] = field(default_factory=dict)   # rows of the events table per kind


@dataclass(frozen=True)
class AggregateReport:
    sessions: int
    wall: WallSplit
    tool_calls: int
    llm_requests: int
    tools: list[ToolStats]
    peak_to_mean_p50: float | None
    peak_to_mean_max: float | None
    peak_to_mean_max_session: str | None
    bursts: int
    bursts_in_tool_calls: int
    static_waste_gb_s: float
    used_gb_s: float
    oom_kills: int
    policy_actions: dict[str, int]
    input_tokens: int = 0
    cached_input_tokens: int | None = None
    uncached_input_tokens: int | None = None
    unknown_cache_input_tokens: int = 0
    events: dict[str, int] = field(default_factory=dict)

    @property
    def burst_share_in_tool_calls(self) -> float | None:
        return self.bursts_in_tool_calls / self.bursts if self.bursts else None


@dataclass(frozen=True)
class Report:
    burst_threshold_bytes: int
    burst_window_s: float
    aggregate: AggregateReport
    sessions: list[SessionReport] = field(default_factory=list)


def merge_traces(traces: list[Trace]) -> Trace:
    """One trace of several; a session id that appears in two traces is an error."""
    import pandas as pd

    if len(traces) == 1:
        return traces[0]
    ids = pd.concat([t.sessions["session_id"] for t in traces], ignore_index=True)
    dup = ids[ids.duplicated()]
    if len(dup):
        raise TraceError(f"session {dup.iloc[0]!r} appears in more than one trace; report them separately")
    merged = {name: pd.concat([t.table(name) for t in traces], ignore_index=True) for name in TABLES}
    return Trace(**merged, source="+".join(sorted({t.source for t in traces})))


def build_report(trace: Trace, *, burst_threshold_bytes: int = DEFAULT_BURST_THRESHOLD_BYTES,
                 burst_window_s: float = DEFAULT_BURST_WINDOW_S) -> Report:
    calls_by = dict(tuple(trace.toolcalls.groupby("session_id", sort=False)))
    samples = trace.samples[trace.samples["scope"] == "sandbox"]
    samples_by = dict(tuple(samples.groupby("session_id", sort=False)))
    llm_by = dict(tuple(trace.llm_requests.groupby("session_id", sort=False)))
    events_by = dict(tuple(trace.events.groupby("session_id", sort=False)))
    sessions = []
    for row in trace.sessions.sort_values("session_id").itertuples(index=False):
        sid = row.session_id
        calls = calls_by.get(sid, trace.toolcalls.iloc[:0])
        llm = llm_by.get(sid, trace.llm_requests.iloc[:0])
        events = events_by.get(sid, trace.events.iloc[:0])
        seen = [calls["end_wall_s"].max(), llm["time_s"].max()]
        if sid in samples_by:
            seen.append(samples_by[sid]["time_s"].max())
        seen = [float(t) for t in seen if not _na(t)]
        sessions.append(SessionReport(
            session_id=sid, source=str(row.source), wall=wall_split(row, calls, max(seen, default=None)),
            tool_calls=len(calls), llm_requests=len(llm),
            input_tokens=int(llm["input_tokens"].sum()), output_tokens=int(llm["output_tokens"].sum()),
            memory=memory_stats(samples_by.get(sid), calls, burst_threshold_bytes, burst_window_s),
            tools=tool_stats(calls), oom_kills=oom_kills(calls, events),
            policy_actions=policy_actions(events), llm=llm_stats(llm),
            events={str(k): int(v) for k, v in events["kind"].value_counts().sort_index().items()}))
    return Report(burst_threshold_bytes, burst_window_s, aggregate(sessions, trace.toolcalls), sessions)


def _na(value: Any) -> bool:
    import pandas as pd

    return bool(pd.isna(value))


def wall_split(session: Any, calls: "pd.DataFrame", last_seen_s: float | None = None) -> WallSplit:
    """`last_seen_s` stands in for a missing end_s (a recording that was killed)."""
    start = float(session.start_s) if not _na(session.start_s) else math.nan
    end = float(session.end_s) if not _na(session.end_s) else (last_seen_s or math.nan)
    if math.isnan(start) or math.isnan(end):
        raise TraceError(f"session {session.session_id!r} has no start_s, or no end_s and no observation")
    intervals = sorted(zip(calls["start_wall_s"].clip(start, end), calls["end_wall_s"].fillna(end).clip(start, end)))
    tool_s, cursor = 0.0, start
    for lo, hi in intervals:            # length of the union of the intervals
        lo = max(lo, cursor)
        if hi > lo:
            tool_s += hi - lo
            cursor = hi
    setup = 0.0 if _na(session.setup_s) else float(session.setup_s)
    untraced = None if _na(session.untraced_s) else float(session.untraced_s)
    return WallSplit(setup, tool_s, (end - start) - tool_s, untraced)


def _percentile(values: "np.ndarray", q: float) -> float | None:
    import numpy as np

    return float(np.percentile(values, q)) if len(values) else None


def tool_stats(calls: "pd.DataFrame") -> list[ToolStats]:
    out = []
    durations = (calls["end_monotonic_s"] - calls["start_monotonic_s"]).astype("float64")
    for tool, group in calls.groupby("tool", sort=False):
        dur = durations[group.index].dropna().to_numpy()
        peaks = group["peak_memory_bytes"].dropna().to_numpy(dtype="float64")
        p50, p95 = _percentile(peaks, 50), _percentile(peaks, 95)
        out.append(ToolStats(str(tool), len(group), _percentile(dur, 50), _percentile(dur, 95), len(peaks),
                             None if p50 is None else int(p50), None if p95 is None else int(p95)))
    return sorted(out, key=lambda t: (-t.count, t.tool))


def find_bursts(times: "np.ndarray", memory: "np.ndarray", calls: "pd.DataFrame",
                threshold_bytes: int, window_s: float) -> list[Burst]:
    import numpy as np

    starts = calls["start_wall_s"].to_numpy(dtype="float64")
    ends = calls["end_wall_s"].to_numpy(dtype="float64", na_value=np.inf)
    lows = np.searchsorted(times, times - window_s, side="left")
    bursts: list[Burst] = []
    run: list[tuple[int, int]] = []            # (sample, its lowest earlier sample)
    for i in range(len(times) + 1):
        if i < len(times):
            # the latest lowest sample, so the rise interval is as tight as the samples allow
            j = i - int(np.argmin(memory[lows[i]:i + 1][::-1]))
            if memory[i] - memory[j] >= threshold_bytes:
                run.append((i, j))
                continue
        if run:
            peak, base = max(run, key=lambda pair: memory[pair[0]])
            rise_start = times[min(b for _, b in run)]
            inside = bool(np.any((starts <= times[peak]) & (ends >= rise_start)))
            bursts.append(Burst(float(rise_start), float(times[peak]),
                                int(memory[peak] - memory[base]), inside))
            run = []
    return bursts


def memory_stats(samples: "pd.DataFrame | None", calls: "pd.DataFrame", threshold_bytes: int,
                 window_s: float) -> MemoryStats | None:
    import numpy as np

    if samples is None:
        return None
    measured = samples[samples["memory_bytes"].notna()].sort_values("time_s")
    if measured.empty:
        return None
    times = measured["time_s"].to_numpy(dtype="float64")
    memory = measured["memory_bytes"].to_numpy(dtype="float64")
    peak, mean = float(memory.max()), float(memory.mean())
    used = float(np.trapezoid(memory, times)) if len(times) > 1 else 0.0
    waste = float(np.trapezoid(peak - memory, times)) if len(times) > 1 else 0.0
    bursts = find_bursts(times, memory, calls, threshold_bytes, window_s)
    return MemoryStats(len(times), int(peak), mean, peak / mean if mean > 0 else None, len(bursts),
                       sum(b.in_tool_call for b in bursts), used / GB, waste / GB)


def oom_kills(calls: "pd.DataFrame", events: "pd.DataFrame") -> int:
    ooms = events[events["kind"] == EVENT_OOM_KILL]
    killed = set(calls.loc[calls["oom_killed"].fillna(False).astype(bool), "call_id"])
    return len(ooms) + len(killed - set(ooms["call_id"].dropna()))


def llm_stats(llm: "pd.DataFrame") -> LlmStats | None:
    import numpy as np

    if llm.empty:
        return None
    ordered = llm.sort_values("time_s", kind="stable")
    main = ordered.loc[~ordered["is_sidechain"].fillna(False).astype(bool), "input_tokens"].dropna()
    main = main.to_numpy(dtype="int64")
    inputs = llm["input_tokens"]
    cached = llm["cache_read_tokens"]
    says = cached.notna() & inputs.notna()
    known_in, known_cached = int(inputs[says].sum()), int(cached[says].sum())
    return LlmStats(
        requests=len(llm), context_first_tokens=int(main[0]) if len(main) else None,
        context_last_tokens=int(main[-1]) if len(main) else None,
        context_max_tokens=int(inputs.max()) if inputs.notna().any() else None,
        context_growth_p50_tokens=float(np.median(np.diff(main))) if len(main) > 1 else None,
        input_tokens=int(inputs.sum()),
        cached_input_tokens=known_cached if says.any() else None,
        uncached_input_tokens=known_in - known_cached if says.any() else None,
        unknown_cache_input_tokens=int(inputs[~says].sum()))


def policy_actions(events: "pd.DataFrame") -> dict[str, int]:
    actions = events.loc[events["kind"] == EVENT_POLICY_ACTION, "action"].fillna("unknown")
    return {str(k): int(v) for k, v in actions.value_counts().sort_index().items()}


def aggregate(sessions: list[SessionReport], all_calls: "pd.DataFrame") -> AggregateReport:
    import numpy as np

    walls = [s.wall for s in sessions]
    untraced = [w.untraced_s for w in walls if w.untraced_s is not None]
    mems = [(s.session_id, s.memory) for s in sessions if s.memory is not None]
    ratios = [(m.peak_to_mean, sid) for sid, m in mems if m.peak_to_mean is not None]
    actions: dict[str, int] = {}
    kinds: dict[str, int] = {}
    for s in sessions:
        for action, n in s.policy_actions.items():
            actions[action] = actions.get(action, 0) + n
        for kind, n in s.events.items():
            kinds[kind] = kinds.get(kind, 0) + n
    llms = [s.llm for s in sessions if s.llm is not None]
    cached = [x.cached_input_tokens for x in llms if x.cached_input_tokens is not None]
    uncached = [x.uncached_input_tokens for x in llms if x.uncached_input_tokens is not None]
    top = max(ratios) if ratios else (None, None)
    return AggregateReport(
        sessions=len(sessions),
        wall=WallSplit(sum(w.setup_s for w in walls), sum(w.tool_s for w in walls),
                       sum(w.agent_s for w in walls), sum(untraced) if untraced else None),
        tool_calls=sum(s.tool_calls for s in sessions), llm_requests=sum(s.llm_requests for s in sessions),
        tools=tool_stats(all_calls[all_calls["session_id"].isin({s.session_id for s in sessions})]),
        peak_to_mean_p50=float(np.median([r for r, _ in ratios])) if ratios else None,
        peak_to_mean_max=top[0], peak_to_mean_max_session=top[1],
        bursts=sum(m.bursts for _, m in mems), bursts_in_tool_calls=sum(m.bursts_in_tool_calls for _, m in mems),
        static_waste_gb_s=sum(m.static_waste_gb_s for _, m in mems), used_gb_s=sum(m.used_gb_s for _, m in mems),
        oom_kills=sum(s.oom_kills for s in sessions), policy_actions=actions,
        input_tokens=sum(x.input_tokens for x in llms), cached_input_tokens=sum(cached) if cached else None,
        uncached_input_tokens=sum(uncached) if uncached else None,
        unknown_cache_input_tokens=sum(x.unknown_cache_input_tokens for x in llms), events=kinds)


# -- rendering -------------------------------------------------------------------
def to_jsonable(report: Report) -> dict[str, Any]:
    def clean(value: Any) -> Any:
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        if isinstance(value, list):
            return [clean(v) for v in value]
        return value

    data = dataclasses.asdict(report)
    data["aggregate"]["burst_share_in_tool_calls"] = report.aggregate.burst_share_in_tool_calls
    for out, src in zip(data["sessions"], report.sessions):
        if out["llm"] is not None:
            out["llm"]["cached_share"] = src.llm.cached_share
    for out, src in [(data["aggregate"]["wall"], report.aggregate.wall)] + [
            (d["wall"], s.wall) for d, s in zip(data["sessions"], report.sessions)]:
        out["traced_s"], out["total_s"] = src.traced_s, src.total_s
    return clean(data)


def render_json(report: Report) -> str:
    return json.dumps(to_jsonable(report), indent=1, allow_nan=False)


def _mb(value: float | None) -> str:
    return "-" if value is None else f"{value / MB:,.0f}"


def _s(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _pct(part: float, whole: float) -> str:
    return f"{100 * part / whole:.0f}%" if whole > 0 else "-"


def render_tools(tools: list[ToolStats]) -> list[str]:
    lines = [f"{'tool':<14}{'calls':>7}{'dur p50 s':>11}{'dur p95 s':>11}{'measured':>10}"
             f"{'peak p50 MB':>13}{'peak p95 MB':>13}"]
    for t in tools:
        lines.append(f"{t.tool:<14}{t.count:>7}{_s(t.duration_p50_s):>11}{_s(t.duration_p95_s):>11}"
                     f"{t.peak_memory_measured:>10}{_mb(t.peak_memory_p50_bytes):>13}{_mb(t.peak_memory_p95_bytes):>13}")
    return lines


def _tokens(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}"


def render_input_tokens(agg: AggregateReport) -> str:
    if agg.cached_input_tokens is None:
        return (f"LLM input tokens: {agg.input_tokens:,} (no request said how many came from a prompt cache)"
                if agg.input_tokens else "LLM input tokens: none recorded")
    known = agg.cached_input_tokens + agg.uncached_input_tokens
    return (f"LLM input tokens: {agg.input_tokens:,} = cached {agg.cached_input_tokens:,} "
            f"({_pct(agg.cached_input_tokens, known)} of those with cache figures), uncached "
            f"{agg.uncached_input_tokens:,}, cache split unknown {agg.unknown_cache_input_tokens:,}")


def render_llm(sessions: list[SessionReport]) -> list[str]:
    """Per session: how the LLM context grew, and how much of the input was cached."""
    rows = [s for s in sessions if s.llm is not None]
    if not rows:
        return []
    lines = [f"{'LLM context (tokens)':<44}{'requests':>9}{'first':>9}{'last':>9}{'max':>9}{'growth/turn':>12}"
             f"{'cached':>12}{'uncached':>12}"]
    for s in rows:
        m = s.llm
        lines.append(f"{s.session_id[:43]:<44}{m.requests:>9}{_tokens(m.context_first_tokens):>9}"
                     f"{_tokens(m.context_last_tokens):>9}{_tokens(m.context_max_tokens):>9}"
                     f"{_tokens(m.context_growth_p50_tokens):>12}{_tokens(m.cached_input_tokens):>12}"
                     f"{_tokens(m.uncached_input_tokens):>12}")
    return [*lines, ""]


def render_events(sessions: list[SessionReport]) -> list[str]:
    rows = [s for s in sessions if s.events]
    if not rows:
        return []
    lines = [f"{'events':<44}per kind (policy actions per action)"]
    for s in rows:
        kinds = ", ".join(f"{k} {v}" for k, v in s.events.items())
        actions = ", ".join(f"{k} {v}" for k, v in s.policy_actions.items())
        lines.append(f"{s.session_id[:43]:<44}{kinds}" + (f" ({actions})" if actions else ""))
    return [*lines, ""]


def render_text(report: Report) -> str:
    agg, w = report.aggregate, report.aggregate.wall
    share = agg.burst_share_in_tool_calls
    lines = [
        f"sessions: {agg.sessions}   tool calls: {agg.tool_calls}   LLM requests: {agg.llm_requests}",
        f"wall time: {w.total_s / 3600:.2f} h = setup {_pct(w.setup_s, w.total_s)}, tool calls "
        f"{_pct(w.tool_s, w.total_s)}, agent/LLM {_pct(w.agent_s, w.total_s)}, untraced "
        f"{_pct(w.untraced_s or 0.0, w.total_s)}",
        f"peak-to-mean memory: median {agg.peak_to_mean_p50 or 0:.2f}, max {agg.peak_to_mean_max or 0:.2f} "
        f"({agg.peak_to_mean_max_session or '-'})",
        f"memory bursts (>= {report.burst_threshold_bytes / MB:.0f} MB within {report.burst_window_s:g} s): "
        f"{agg.bursts}, in tool calls {agg.bursts_in_tool_calls}"
        + (f" ({share:.0%})" if share is not None else ""),
        f"static limit at each session's peak: {agg.static_waste_gb_s:,.0f} GB*s wasted of "
        f"{agg.static_waste_gb_s + agg.used_gb_s:,.0f} GB*s allocated",
        f"OOM kills: {agg.oom_kills}   policy actions: "
        + (", ".join(f"{k} {v}" for k, v in agg.policy_actions.items()) or "none")
        + "   events: " + (", ".join(f"{k} {v}" for k, v in agg.events.items()) or "none"),
        render_input_tokens(agg),
        "", *render_tools(agg.tools), "", *render_llm(report.sessions), *render_events(report.sessions),
        f"{'session':<44}{'traced s':>9}{'setup s':>8}{'tool':>6}{'agent':>6}{'calls':>6}{'LLM':>5}"
        f"{'peak MB':>9}{'mean MB':>9}{'peak/mean':>10}{'bursts':>8}{'waste GB*s':>11}{'OOM':>4}",
    ]
    for s in report.sessions:
        m, sw = s.memory, s.wall
        mem = (f"{_mb(m.peak_bytes):>9}{_mb(m.mean_bytes):>9}{(m.peak_to_mean or 0):>10.2f}"
               f"{f'{m.bursts_in_tool_calls}/{m.bursts}':>8}{m.static_waste_gb_s:>11,.0f}") if m else f"{'-':>47}"
        lines.append(f"{s.session_id[:43]:<44}{sw.traced_s:>9.0f}{sw.setup_s:>8.0f}{_pct(sw.tool_s, sw.traced_s):>6}"
                     f"{_pct(sw.agent_s, sw.traced_s):>6}{s.tool_calls:>6}{s.llm_requests:>5}{mem}{s.oom_kills:>4}")
    return "\n".join(lines)
