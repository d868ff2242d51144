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


def test_llm_context_growth_and_cached_input(synthetic_trace):
    import pandas as pd

    from agentcg.profiler.trace import frame

    llm = synthetic_trace.llm_requests
    synthetic_trace.llm_requests = pd.concat([llm, frame("llm_requests", [
        # Anthropic-style rows: 21,033 context of which 20,773 read from the cache; a sub-agent's
        {"session_id": "s1", "request_id": "a1", "time_s": 1010.0, "input_tokens": 21033,
         "cache_read_tokens": 20773, "cache_creation_tokens": 252, "usage_format": "anthropic"},
        {"session_id": "s1", "request_id": "a2", "time_s": 1005.0, "input_tokens": 500, "is_sidechain": True,
         "cache_read_tokens": 0, "cache_creation_tokens": 500, "usage_format": "anthropic"}])], ignore_index=True)
    report = build_report(synthetic_trace)
    m = report.sessions[0].llm
    # main conversation in time order: 1000, 1000, 1000 (t=1000..1002), then 21,033
    assert (m.requests, m.context_first_tokens, m.context_last_tokens, m.context_max_tokens) == (5, 1000, 21033, 21033)
    assert m.context_growth_p50_tokens == 0.0
    assert (m.cached_input_tokens, m.uncached_input_tokens, m.unknown_cache_input_tokens) == (20773, 760, 3000)
    assert m.cached_share == pytest.approx(20773 / 21533)
    text = render_text(report)
    assert "LLM input tokens: 24,533 = cached 20,773 (96% of those with cache figures), uncached 760, " \
           "cache split unknown 3,000" in text
    assert json.loads(render_json(report))["sessions"][0]["llm"]["cached_share"] == pytest.approx(0.9647, abs=1e-4)
    synthetic_trace.llm_requests = llm.iloc[:0]
    assert build_report(synthetic_trace).sessions[0].llm is None
    assert "LLM input tokens: none recorded" in render_text(build_report(synthetic_trace))


def test_events_per_kind_in_text(synthetic_trace):
    report = build_report(synthetic_trace)
    assert report.sessions[0].events == {"kv_decision": 1, "oom_kill": 1, "policy_action": 3}
    text = render_text(report)
    assert "events: kv_decision 1, oom_kill 1, policy_action 3" in text
    assert "kv_decision 1, oom_kill 1, policy_action 3 (freeze 2, kill 1)" in text


def test_memory_plot_marks_events(synthetic_trace, tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from agentcg.profiler.plots import _draw_events, write_plots
    from agentcg.profiler.trace import frame

    events = frame("events", [
        {"session_id": "s1", "time_s": 1020.0, "kind": "policy_action", "action": "freeze"},
        {"session_id": "s1", "time_s": 1024.0, "kind": "policy_action", "action": "thaw"},
        {"session_id": "s1", "time_s": 1016.0, "kind": "reclaim_stall"},
        {"session_id": "s1", "time_s": 1100.0, "kind": "oom_kill", "call_id": "C"},
        {"session_id": "s1", "time_s": 1070.0, "kind": "kv_decision", "action": "offload"},
        {"session_id": "s1", "time_s": 1071.0, "kind": "something_new"}])
    fig, ax = plt.subplots()
    handles = _draw_events(ax, events, 1000.0)
    assert list(handles) == ["reclaim stall (1)", "freeze", "thaw", "OOM kill", "KV directive", "other event"]
    assert sorted(round(line.get_xdata()[0]) for line in ax.lines[1:]) == [20, 24, 70, 71, 100]
    plt.close(fig)
    synthetic_trace.events = events
    paths = write_plots(synthetic_trace, tmp_path / "plots")
    assert [p.name for p in paths] == ["tools-peak-memory.png", "session-s1.png"]
