"""Pick recorded sessions whose memory bursts can be made to overlap, and align them.

bench/bench_replay.py builds its scenario from these, so that the figures it prints say
how the sessions were chosen, from the dataset itself:

    levels = sustained_levels(trace)                 # every session, highest first
    picks = [level.session_id for level in levels[:4]]
    windows = align_call_ends(trace, picks)           # each one's largest call ends together
    stacked_peak_bytes(trace, windows)                # what they hold together, as recorded

A session's *sustained level* is the highest memory its sandbox holds for a whole stretch
(default 20 s): over every stretch of its sandbox samples, the `quantile` (default 0.2:
80 % of the stretch is at or above it) of the memory in it; the best stretch counts. A
spike of one sample (a pytest peaking for a second) scores low; a build holding 0.6 GiB
for a minute scores high. Bursts that last can be stacked robustly: a replay that runs a
second late still overlaps them, where single-sample spikes miss each other.

Windows are in recorded seconds from each session's start, as `agentcg replay --session
ID=PRIORITY@FROM:TO` takes them (the calls that start inside a window are replayed).
Nothing here touches a cgroup: it reads a Trace.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

from agentcg.errors import InvalidInput, TraceError

if TYPE_CHECKING:
    from agentcg.profiler.trace import Trace


@dataclass(frozen=True)
class SustainedLevel:
    session_id: str
    level_bytes: int      # held for the whole stretch (its quantile)
    at_s: float           # where the stretch ends, recorded seconds from the session's start


@dataclass(frozen=True)
class LargestCall:
    session_id: str
    call_id: str
    tool: str
    start_s: float        # recorded seconds from the session's start
    end_s: float
    peak_bytes: int


@dataclass(frozen=True)
class Window:
    session_id: str
    from_s: float
    to_s: float
    call: LargestCall     # the call the window is aligned on

    def choice(self, priority: str) -> str:
        """The `agentcg replay --session` argument."""
        return f"{self.session_id}={priority}@{self.from_s:.1f}:{self.to_s:.1f}"


def _starts(trace: "Trace") -> dict[str, float]:
    return {str(s): float(t) for s, t in zip(trace.sessions["session_id"], trace.sessions["start_s"])
            if t is not None and not math.isnan(float(t))}


def _sandbox_samples(trace: "Trace"):
    samples = trace.samples
    return samples[(samples["scope"] == "sandbox") & samples["memory_bytes"].notna()]


def sustained_levels(trace: "Trace", *, stretch_s: float = 20.0, quantile: float = 0.2,
                     min_coverage: float = 0.75) -> list[SustainedLevel]:
    """Every session's sustained level, highest first. A stretch counts when its samples
    cover at least `min_coverage` of it (at the dataset's 1 s sampling: 15 of 20)."""
    import pandas as pd

    if not stretch_s > 0 or not 0 <= quantile <= 1 or not 0 < min_coverage <= 1:
        raise InvalidInput("stretch_s must be > 0, quantile in 0..1 and min_coverage in (0, 1]")
    starts = _starts(trace)
    out = []
    for session_id, group in _sandbox_samples(trace).groupby("session_id", sort=True):
        group = group.sort_values("time_s", kind="stable")
        times = group["time_s"].to_numpy(dtype=float)
        if len(times) < 2:
            continue
        step_s = max(1e-3, float(pd.Series(times).diff().median()))
        series = pd.Series(group["memory_bytes"].to_numpy(dtype=float), index=pd.to_datetime(times, unit="s"))
        rolled = series.rolling(f"{int(stretch_s * 1000)}ms",
                                min_periods=max(1, int(min_coverage * stretch_s / step_s))).quantile(quantile)
        if rolled.isna().all():
            continue
        import numpy as np

        best = int(np.nanargmax(rolled.to_numpy()))
        start = starts.get(str(session_id), float(times[0]))
        out.append(SustainedLevel(str(session_id), int(rolled.iloc[best]), float(times[best]) - start))
    out.sort(key=lambda level: (-level.level_bytes, level.session_id))
    return out


def largest_call(trace: "Trace", session_id: str) -> LargestCall:
    """The session's tool call with the largest recorded peak (ties: the earlier)."""
    calls = trace.toolcalls[(trace.toolcalls["session_id"] == session_id) & trace.toolcalls["peak_memory_bytes"].notna()]
    if not len(calls):
        raise TraceError(f"session {session_id}: no tool call with a recorded memory peak to align on")
    start = _starts(trace).get(session_id)
    if start is None:
        raise TraceError(f"session {session_id}: no start time")
    top = calls.sort_values(["peak_memory_bytes", "start_wall_s"], ascending=[False, True], kind="stable").iloc[0]
    begin = float(top["start_wall_s"]) - start
    end = float(top["end_wall_s"]) - start if not _isna(top["end_wall_s"]) else begin
    return LargestCall(session_id, str(top["call_id"]), str(top["tool"]), begin, max(begin, end),
                       int(top["peak_memory_bytes"]))


def align_call_ends(trace: "Trace", session_ids: Sequence[str], *, lead_s: float = 3.0,
                    tail_s: float = 5.0) -> list[Window]:
    """One window per session, all of the same length, in which each session's largest
    call ends at the same offset: `lead_s` after the start of the longest of those calls.
    Memory in these sessions grows through a call and is most at its end, so aligning the
    ends stacks the peaks; every aligned call starts inside its window (it is replayed
    whole). The windows go on `tail_s` past the common end."""
    if lead_s < 0 or tail_s < 0:
        raise InvalidInput("lead_s and tail_s must be >= 0 seconds")
    calls = [largest_call(trace, s) for s in session_ids]
    end_at = lead_s + max((c.end_s - c.start_s for c in calls), default=0.0)
    windows = []
    for call in calls:
        begin = call.end_s - end_at
        if begin < 0:
            raise TraceError(f"session {call.session_id}: its largest call ends {call.end_s:.1f} s into the "
                             f"recording, before the {end_at:.1f} s the aligned windows need; pick another session")
        windows.append(Window(call.session_id, begin, begin + end_at + tail_s, call))
    return windows


def stacked_peak_bytes(trace: "Trace", windows: Sequence[Window], *, step_s: float = 1.0) -> int:
    """The most the sessions' sandboxes held together, as recorded, with each one's window
    laid over the others (each sampled at `step_s`, the last sample held)."""
    import numpy as np

    if not windows:
        return 0
    starts = _starts(trace)
    samples = _sandbox_samples(trace)
    length = max(w.to_s - w.from_s for w in windows)
    grid = np.arange(0.0, length, step_s)
    total = np.zeros_like(grid)
    for w in windows:
        mine = samples[samples["session_id"] == w.session_id].sort_values("time_s", kind="stable")
        times = mine["time_s"].to_numpy(dtype=float) - starts.get(w.session_id, 0.0) - w.from_s
        memory = mine["memory_bytes"].to_numpy(dtype=float)
        if not len(times):
            continue
        index = np.searchsorted(times, grid, side="right") - 1
        held = np.where(index >= 0, memory[np.clip(index, 0, None)], memory[0])
        total += np.where(grid < w.to_s - w.from_s, held, 0.0)
    return int(total.max()) if len(total) else 0


def _isna(value) -> bool:
    import pandas as pd

    return bool(pd.isna(value))
