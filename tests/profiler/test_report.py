"""The report's figures on a synthetic session whose answers are worked out by hand
(see the synthetic_trace fixture), and its renderings."""
from __future__ import annotations

import json

import pytest

from agentcg.errors import TraceError
from agentcg.profiler.report import build_report, merge_traces, render_json, render_text

MB = 1000**2


def test_wall_split(synthetic_trace):
    wall = build_report(synthetic_trace).sessions[0].wall
    # calls A 1010-1030 and B 1020-1040 overlap: union 30 s, plus C 1090-1100
    assert (wall.setup_s, wall.tool_s, wall.agent_s, wall.untraced_s) == (10.0, 40.0, 60.0, 5.0)
    assert wall.total_s == 115.0


def test_memory_figures(synthetic_trace):
    memory = build_report(synthetic_trace).sessions[0].memory
    assert memory.samples == 101 and memory.peak_bytes == 600 * MB
    assert memory.mean_bytes == pytest.approx(12400 / 101 * MB)
    assert memory.peak_to_mean == pytest.approx(600 / (12400 / 101))
    # used: 100 MB * 100 s + 1500 + 800 MB*s of bursts; allocated at the peak: 60,000 MB*s
    assert memory.used_gb_s == pytest.approx(12.3)
    assert memory.static_waste_gb_s == pytest.approx(47.7)


@pytest.mark.parametrize("threshold_mb, window_s, bursts, inside", [
    (300, 10.0, 2, 1),     # 600 MB in call A; 500 MB while no call ran
    (450, 10.0, 1, 1),     # the 500 MB burst rose only 400 MB
    (450, 0.5, 0, 0),      # no earlier sample within half a second: no rise to measure
    (550, 10.0, 0, 0),
])
def test_bursts(synthetic_trace, threshold_mb, window_s, bursts, inside):
    report = build_report(synthetic_trace, burst_threshold_bytes=threshold_mb * MB, burst_window_s=window_s)
    assert (report.aggregate.bursts, report.aggregate.bursts_in_tool_calls) == (bursts, inside)
    assert report.aggregate.burst_share_in_tool_calls == (inside / bursts if bursts else None)


def test_tools_ooms_and_actions(synthetic_trace):
    session = build_report(synthetic_trace).sessions[0]
    bash = session.tools[0]
    assert (bash.tool, bash.count, bash.duration_p50_s, bash.duration_p95_s) == ("Bash", 2, 15.0, 19.5)
    assert (bash.peak_memory_p50_bytes, bash.peak_memory_measured) == (400 * MB, 2)
    # C has both an oom_kill event and oom_killed=True (one kill); B only the flag
    assert session.oom_kills == 2
    assert session.policy_actions == {"freeze": 2, "kill": 1}
    assert (session.llm_requests, session.input_tokens, session.output_tokens) == (3, 3000, 30)


def test_renderings(synthetic_trace):
    report = build_report(synthetic_trace)
    data = json.loads(render_json(report))
    assert data["aggregate"]["burst_share_in_tool_calls"] == 0.5
    assert data["sessions"][0]["memory"]["peak_bytes"] == 600 * MB
    assert data["aggregate"]["wall"]["total_s"] == 115.0
    text = render_text(report)
    assert "max 4.89 (s1)" in text and "in tool calls 1 (50%)" in text and "freeze 2, kill 1" in text


def test_session_without_samples_or_end(synthetic_trace):
    synthetic_trace.samples = synthetic_trace.samples.iloc[:0]
    assert build_report(synthetic_trace).sessions[0].memory is None
    assert "-" in render_text(build_report(synthetic_trace))
    synthetic_trace.sessions.loc[0, "end_s"] = None   # a killed recording: the last call ends it
    assert build_report(synthetic_trace).sessions[0].wall.agent_s == 60.0
    synthetic_trace.sessions.loc[0, "start_s"] = None
    with pytest.raises(TraceError, match="'s1' has no start_s"):
        build_report(synthetic_trace)


def test_merge_refuses_duplicate_sessions(synthetic_trace):
    with pytest.raises(TraceError, match="'s1' appears in more than one trace"):
        merge_traces([synthetic_trace, synthetic_trace])
