"""`agentcg replay` on the real kernel, with small synthetic sessions (a few seconds,
a few hundred MiB), plus the planning from traces and the CLI's refusals."""
from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from agentcg.controller.replay import Replay, ReplayConfig
from agentcg.controller.replay_cli import replay as replay_command
from agentcg.controller.replay_session import SessionChoice, parse_session_choice, plan_sessions
from agentcg.errors import InvalidInput
from agentcg.profiler.trace import Trace, frame, write_trace

MiB = 1 << 20
T0 = 1_700_000_000.0


def _trace(sessions: dict[str, list[tuple[str, float, float, list[tuple[float, int]]]]], length_s: float) -> Trace:
    """sessions: name -> calls (call_id, start_s, end_s, [(t_s, MiB), ...]); agents hold nothing."""
    trace = Trace.empty()
    trace.sessions = frame("sessions", [{"session_id": s, "sandbox": s, "source": "test", "start_s": T0,
                                         "end_s": T0 + length_s} for s in sessions])
    calls, samples = [], []
    for s, entries in sessions.items():
        for call_id, start, end, curve in entries:
            calls.append({"session_id": s, "sandbox": s, "call_id": call_id, "tool": "Bash", "command": "x",
                          "start_monotonic_s": T0 + start, "start_wall_s": T0 + start,
                          "end_monotonic_s": T0 + end, "end_wall_s": T0 + end,
                          "peak_memory_bytes": max(m for _, m in curve) * MiB})
            samples += [{"session_id": s, "sandbox": s, "scope": "toolcall", "call_id": call_id, "time_s": T0 + t,
                         "memory_bytes": m * MiB, "cpu_cores": 0.1} for t, m in curve]
        samples += [{"session_id": s, "sandbox": s, "scope": "sandbox", "time_s": T0 + t, "memory_bytes": 0,
                     "cpu_cores": 0.0} for t in (0.0, length_s)]
    trace.toolcalls, trace.samples = frame("toolcalls", calls), frame("samples", samples)
    return trace


# hi holds 200 MiB until 2.5 s; lo grows 20 MiB per 0.1 s to 240 MiB and holds it to 2.5 s.
# hi holds as long as lo runs, so that the two overlap even when a loaded host runs lo's
# steps late (hi's end is a timer; lo's growth is CPU work).
BURST = {
    "hi": [("a", 0.0, 2.5, [(0.0, 200), (2.4, 200)])],
    "lo": [("b", 0.0, 2.5, [(0.1 * i, min(240, 20 * i)) for i in range(1, 24)])],
}
CHOICES = [SessionChoice("hi", "high"), SessionChoice("lo", "low")]


def test_plan_follows_the_call_curves_and_the_wait_order():
    plans = plan_sessions(_trace(BURST, 3.0), CHOICES, speed=2.0)
    lo = plans[1].calls[0]
    assert lo.peak_bytes == 240 * MiB and len(lo.steps) == 23
    assert abs(sum(step[0] for step in lo.steps) - 2.5 / 2) < 1e-6     # compressed by --speed
    trace = _trace({"s": [("x", 0, 1, [(0.5, 10)]), ("y", 0.5, 2, [(1, 10)]), ("z", 1.5, 3, [(2, 10)])]}, 3)
    calls = plan_sessions(trace, [SessionChoice("s")], speed=1)[0].calls
    assert [c.wait_for for c in calls] == [(), (), (0,)]               # z waits for x only


def test_bad_choices_are_refused():
    trace = _trace(BURST, 3.0)
    with pytest.raises(InvalidInput, match="not in the trace"):
        plan_sessions(trace, [SessionChoice("nope")], speed=1)
    with pytest.raises(InvalidInput, match="speed"):
        plan_sessions(trace, CHOICES, speed=0)
    with pytest.raises(InvalidInput, match="priority"):
        parse_session_choice("hi=urgent")


def test_burst_past_the_budget_is_frozen_then_thawed_not_killed(cgroup_tree):
    """lo's burst pushes the host past the freeze threshold while hi holds 200 MiB; hi
    ends (2.5 s) well before the grace period does (5 s, headroom for a loaded CI host, where
    touching 200 MiB takes seconds), so lo is thawed and completes: nothing killed."""
    plans = plan_sessions(_trace(BURST, 3.0), CHOICES, speed=1.0)
    config = ReplayConfig(policy="agentcg", budget_bytes=480 * MiB, grace_s=5.0)
    result = Replay(cgroup_tree, plans, config).run()
    kinds = [a.action.kind for a in result.applied if a.ok]
    assert "freeze" in kinds or "throttle" in kinds, kinds
    assert "kill" not in kinds and result.calls_killed == 0
    assert all(s.survived for s in result.sessions)
    if "freeze" in kinds:
        assert "thaw" in kinds
    assert result.host_peak_bytes <= 480 * MiB
    assert not cgroup_tree.exists("replay")


def test_without_a_policy_the_kernel_kills_at_the_budget(cgroup_tree):
    """The same burst under policy none and a 400 MiB parent limit: the OOM killer acts."""
    plans = plan_sessions(_trace(BURST, 3.0), CHOICES, speed=1.0)
    result = Replay(cgroup_tree, plans, ReplayConfig(policy="none", budget_bytes=400 * MiB)).run()
    assert result.oom_kills >= 1
    assert result.actions == {}


def test_cli_replays_a_trace_file_as_json(cgroup_tree, tmp_path):
    """The command makes and removes its own top-level cgroup: here the fixture's name,
    which the fixture then finds gone (and would remove if it were left)."""
    path = write_trace(_trace({"s": [("x", 0.0, 0.5, [(0.1, 30), (0.4, 30)])]}, 1.0), tmp_path / "t.zip")
    out = CliRunner().invoke(replay_command, [str(path), "--session", "s=high", "--policy", "static",
                                              "--budget", "256M", "--speed", "2", "--json",
                                              "--cgroup-root", cgroup_tree.root])
    assert out.exit_code == 0, out.output
    data = json.loads(out.output)
    assert data["sessions"][0]["survived"] and data["sessions"][0]["calls_ok"] == 1
    assert data["actions"] == {"limit": 1} and data["calls_killed"] == 0


def test_cli_refuses_bad_input(tmp_path):
    path = write_trace(_trace(BURST, 3.0), tmp_path / "t.zip")
    runner = CliRunner()
    assert runner.invoke(replay_command, [str(path), "--session", "hi", "--budget", "lots"]).exit_code != 0
    result = runner.invoke(replay_command, [str(path), "--session", "missing"])
    assert isinstance(result.exception, InvalidInput)



def test_replay_decides_through_the_control_core(cgroup_tree, monkeypatch):
    """Replay runs no policy loop of its own: every tick is a ControlCore step (the daemon's
    loop), and what it applied is in the core's event log."""
    from agentcg.controller.core import ControlCore

    steps = []
    original = ControlCore.step

    def counted(self, *args, **kwargs):
        step = original(self, *args, **kwargs)
        steps.append(step)
        return step

    monkeypatch.setattr(ControlCore, "step", counted)
    plans = plan_sessions(_trace({"s": [("a", 0.0, 0.5, [(0.0, 20), (0.4, 20)])]}, 1.0), [SessionChoice("s", "high")],
                          speed=1.0)
    replay = Replay(cgroup_tree, plans, ReplayConfig(policy="agentcg", budget_bytes=256 * MiB))
    result = replay.run()
    assert isinstance(replay.core, ControlCore) and len(steps) >= 2
    assert [a.action.kind for a in result.applied] == [e["kind"] for e in replay.core.log.since(0)["events"]
                                                     if e["kind"] != "admit"]
    assert result.sessions[0].alloc_p95_s is not None       # its call allocated 20 MiB in 8 MiB chunks


def test_a_window_replays_part_of_a_session():
    trace = _trace({"s": [("x", 0, 1, [(0.5, 10)]), ("y", 2, 3, [(2.5, 10)]), ("z", 5, 6, [(5.5, 10)])]}, 8)
    plan = plan_sessions(trace, [parse_session_choice("s=low@1.5:4")], speed=1)[0]
    assert [c.record_id for c in plan.calls] == ["y"] and plan.calls[0].start_s == pytest.approx(0.5)
    assert plan.duration_s == pytest.approx(2.5) and plan.priority == "low"
    with pytest.raises(InvalidInput, match="window"):
        parse_session_choice("s@4:2")
