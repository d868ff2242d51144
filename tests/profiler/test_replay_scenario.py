"""Picking and aligning sessions for a replay (profiler/replay_scenario.py), on a synthetic
trace whose levels are known by hand (1 Hz sandbox samples, as the AgentCgroup dataset)."""
from __future__ import annotations

import pytest

from agentcg.errors import TraceError
from agentcg.profiler.replay_scenario import (
    align_call_ends, largest_call, stacked_peak_bytes, sustained_levels,
)
from agentcg.profiler.trace import Trace, frame

MiB = 1 << 20
T0 = 1_700_000_000.0


def _trace(sessions: dict[str, tuple[list[int], list[tuple[str, float, float, int]]]]) -> Trace:
    """name -> (sandbox MiB at each second, calls (call_id, start_s, end_s, peak MiB))."""
    trace = Trace.empty()
    trace.sessions = frame("sessions", [{"session_id": s, "sandbox": s, "source": "test", "start_s": T0,
                                         "end_s": T0 + len(curve)} for s, (curve, _) in sessions.items()])
    calls, samples = [], []
    for s, (curve, entries) in sessions.items():
        samples += [{"session_id": s, "sandbox": s, "scope": "sandbox", "time_s": T0 + t, "memory_bytes": m * MiB,
                     "cpu_cores": 0.1} for t, m in enumerate(curve)]
        calls += [{"session_id": s, "sandbox": s, "call_id": c, "tool": "Bash", "start_wall_s": T0 + a,
                   "end_wall_s": T0 + b, "peak_memory_bytes": peak * MiB} for c, a, b, peak in entries]
    trace.toolcalls, trace.samples = frame("toolcalls", calls), frame("samples", samples)
    return trace


# spike: 100 MiB with one 2000 MiB sample; plateau: 600 MiB held 10-40 s; ramp: grows
# from 100 MiB at 20 s to 400 MiB at 50 s
SESSIONS = {
    "spike": ([100] * 30 + [2000] + [100] * 29, [("s1", 29.5, 31.0, 2000)]),
    "plateau": ([100] * 10 + [600] * 30 + [100] * 20, [("p0", 2.0, 4.0, 150), ("p1", 10.0, 40.0, 600)]),
    "ramp": ([100] * 20 + [100 + 10 * t for t in range(31)] + [100] * 9, [("r1", 20.0, 50.0, 400)]),
}


def test_a_held_plateau_ranks_above_a_one_sample_spike():
    levels = sustained_levels(_trace(SESSIONS), stretch_s=20.0)
    assert [lv.session_id for lv in levels] == ["plateau", "ramp", "spike"]
    assert levels[0].level_bytes == 600 * MiB
    assert levels[-1].level_bytes == 100 * MiB             # the 2000 MiB second does not count
    assert 10 <= levels[0].at_s <= 40                        # the stretch ends inside the plateau


def test_largest_call_and_aligned_ends():
    trace = _trace(SESSIONS)
    assert largest_call(trace, "plateau").call_id == "p1"
    windows = align_call_ends(trace, ["plateau", "ramp"], lead_s=3.0, tail_s=5.0)
    # both calls last 30 s: each window starts 3 s before its call, and the ends meet at 33 s
    assert [(w.from_s, w.to_s) for w in windows] == [(7.0, 45.0), (17.0, 55.0)]
    assert all(w.call.start_s >= w.from_s for w in windows)          # every aligned call is replayed whole
    assert windows[0].choice("high") == "plateau=high@7.0:45.0"
    # laid over each other, as recorded: at 32 s the plateau's last 600 MiB and the ramp's 390
    assert stacked_peak_bytes(trace, windows) == 990 * MiB


def test_a_call_too_early_to_align_is_refused():
    trace = _trace(SESSIONS)
    with pytest.raises(TraceError, match="pick another session"):
        align_call_ends(trace, ["plateau", "spike"], lead_s=3.0)     # the spike's call ends at 31 s < 33 s
    with pytest.raises(TraceError, match="no tool call"):
        largest_call(_trace({"idle": ([100] * 10, [])}), "idle")
