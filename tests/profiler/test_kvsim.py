"""The KV simulator: hand-computed step times, prefix reuse, policies under memory
pressure, bad input (a throwing policy, unknown directives, a full tier, missing tool
durations) and the real AgentCgroup sessions (skipped without the dataset)."""
from __future__ import annotations

import math

import pytest

from agentcg.cli import main
from agentcg.engine_protocol import Action, ComputeCost, Directive
from agentcg.errors import TraceError
from agentcg.policies.kv import POLICY_NAMES
from agentcg.policies.kv.types import NO_DECISION, Decision, Trigger
from agentcg.profiler.kvsim import SimConfig, simulate
from agentcg.profiler.kvsim_cost import EngineModel, gpu_preset, load_engine_model
from agentcg.profiler.kvsim_report import build_config, format_table
from agentcg.profiler.kvsim_sessions import SimSession, SimTurn, load_sessions, sessions_from_trace
from agentcg.profiler.trace import Trace, frame, write_trace

COST = ComputeCost(step_fixed_s=0.01, token_s=1e-4, prefill_attn_s_per_token_pos=1e-8,
                   decode_kv_read_s_per_token=1e-6, max_batched_tokens=2048)
BPT = 1024
MODEL = EngineModel(COST, BPT, 1e9, 1e9, 1e8, 2e8, "test model")
GIB = 1 << 30


def config(gpu_tokens: int, host_tokens: int = 0, ssd_tokens: int = 0) -> SimConfig:
    return SimConfig(MODEL, gpu_tokens * BPT, host_tokens * BPT, host_tokens * BPT, ssd_tokens * BPT)


def session(name: str, *turns: tuple[int, int, float], tool: str = "Bash:pytest") -> SimSession:
    return SimSession(name, name, tuple(SimTurn(i, o, tool if g else None, g) for i, o, g in turns))


def test_one_call_takes_the_hand_computed_steps():
    result = simulate([session("a", (1000, 3, 0.0))], "vllm-v1", config(100_000))
    prefill = 0.01 + 1000 * 1e-4 + 1e-8 * 1000 * 500          # one chunk, attention over 0..999
    decode = [0.01 + 1e-4 + 1e-6 * ctx for ctx in (1001, 1002)]
    assert result.jct_s == [pytest.approx(prefill + sum(decode))]
    assert result.recomputed_tokens == 0 and result.prefilled_tokens == 1000


def test_the_next_call_reuses_the_kept_prefix_in_whole_blocks():
    result = simulate([session("a", (1000, 10, 5.0), (1200, 10, 0.0))], "vllm-v1", config(100_000))
    # The first call leaves the KV of 1,009 tokens (the last sampled one has none yet);
    # 1,008 (63 blocks) are hit and 1 is recomputed.
    assert result.recomputed_tokens == 1
    assert result.prefilled_tokens == 1000 + (1200 - 1008)
    assert result.idle_held_gbs == 0.0                         # cached, not pinned
    # The step that recomputes 1 of its 192 tokens, times the running KV (1,008 + 192/2).
    step_s = 0.01 + 192 * 1e-4 + 1e-8 * 192 * (1008 + 96)
    assert result.recompute_gbs == pytest.approx(1 / 192 * step_s * 1104 * BPT / 1e9)


def _pressure_sessions() -> list[SimSession]:
    return [session(f"s{i}", (20_000, 50, 3.0), (21_000, 50, 3.0), (22_000, 50, 0.0)) for i in range(4)]


@pytest.mark.parametrize("policy", POLICY_NAMES)
def test_every_policy_finishes_every_session_under_memory_pressure(policy):
    result = simulate(_pressure_sessions(), policy, config(50_000, host_tokens=200_000, ssd_tokens=400_000))
    assert len(result.jct_s) == 4 and all(math.isfinite(j) and j > 0 for j in result.jct_s)
    assert result.policy_errors == 0 and result.unknown_directives == 0


def test_vllm_recomputes_what_agentcg_swaps():
    cfg = config(50_000, host_tokens=200_000)
    vllm = simulate(_pressure_sessions(), "vllm-v1", cfg)
    ours = simulate(_pressure_sessions(), "agentcg", cfg)
    assert vllm.recomputed_tokens > 20_000
    assert ours.recomputed_tokens < vllm.recomputed_tokens / 10
    assert ours.bytes_moved["gpu_to_host"] > 0 and vllm.bytes_moved["gpu_to_host"] == 0
    assert 0 < ours.peak_host_kv_bytes <= 200_000 * BPT


class _Scripted:
    """A test policy: `on_pause` builds the directives of every PAUSE; raises if asked."""

    shares_host_memory = False

    def __init__(self, name, on_pause=None, boom=False):
        self.name, self.on_pause, self.boom = name, on_pause, boom

    def decide(self, snap):
        if self.boom:
            raise RuntimeError("policy bug")
        if snap.trigger is Trigger.PAUSE and self.on_pause:
            return Decision(tuple(self.on_pause(snap.subject)))
        return NO_DECISION

    def observe(self, event):
        pass

    def waiting_key(self, view):
        return (view.arrival_s,)


def test_a_policy_that_throws_falls_back_to_vllm_and_is_counted():
    result = simulate(_pressure_sessions(), _Scripted("boom", boom=True), config(50_000))
    assert result.policy_errors > 0 and len(result.jct_s) == 4


def test_directives_for_unknown_requests_are_refused_and_counted():
    policy = _Scripted("ghost", lambda rid: [Directive("no-such-request", Action.DISCARD)])
    result = simulate([session("a", (1000, 10, 1.0), (1100, 10, 0.0))], policy, config(100_000))
    assert result.unknown_directives == 1 and len(result.jct_s) == 1


def test_a_swap_into_a_full_host_tier_is_refused_and_the_kv_stays():
    policy = _Scripted("swapper", lambda rid: [Directive(rid, Action.KEEP), Directive(rid, Action.SWAP_TO_HOST)])
    result = simulate([session("a", (1000, 10, 1.0), (1100, 10, 0.0))], policy, config(100_000, host_tokens=100))
    assert result.refused_directives == 1
    assert result.bytes_moved["gpu_to_host"] == 0 and result.recomputed_tokens == 1


def test_a_swap_that_fits_moves_the_kv_and_brings_it_back():
    policy = _Scripted("swapper", lambda rid: [Directive(rid, Action.KEEP), Directive(rid, Action.SWAP_TO_HOST)])
    result = simulate([session("a", (1000, 10, 1.0), (1100, 10, 0.0))], policy, config(100_000, host_tokens=10_000))
    assert result.refused_directives == 0
    assert result.bytes_moved["gpu_to_host"] == 1009 * BPT == result.bytes_moved["host_to_gpu"]
    assert result.peak_host_kv_bytes == 1009 * BPT


def _trace(missing_end: bool) -> Trace:
    trace = Trace.empty("test")
    trace.sessions = frame("sessions", [{"session_id": "s1", "sandbox": "box1"}, {"session_id": "s2", "sandbox": "box2"}])
    rows = [{"session_id": "s1", "sandbox": "box1", "call_id": "c1", "tool": "Bash", "command": "pytest -q",
             "start_monotonic_s": 0.01, "start_wall_s": 0.01, "end_monotonic_s": 5.01, "end_wall_s": 5.01},
            {"session_id": "s1", "sandbox": "box1", "call_id": "c2", "tool": "Read", "command": "",
             "start_monotonic_s": 7.01, "start_wall_s": 7.01,
             "end_monotonic_s": None if missing_end else 7.05, "end_wall_s": None if missing_end else 7.05}]
    trace.toolcalls = frame("toolcalls", rows)
    trace.llm_requests = frame("llm_requests", [
        {"session_id": "s1", "request_id": f"r{i}", "time_s": t, "input_tokens": n, "output_tokens": 20}
        for i, (t, n) in enumerate([(0.0, 1000), (7.0, 1500), (8.0, 1600)])])
    trace.samples = frame("samples", [{"session_id": "s1", "sandbox": "box1", "scope": "sandbox",
                                       "time_s": 3.0, "memory_bytes": 300 << 20}])
    return trace


def test_trace_conversion_gaps_tools_and_sandbox_memory():
    loaded = sessions_from_trace(_trace(missing_end=False))
    (s1,) = loaded.sessions
    assert loaded.skipped == [("s2", "no LLM requests in the trace")] and loaded.imputed_durations == 0
    assert [t.tool for t in s1.turns] == ["Bash:pytest", "Read", None]
    assert [t.tool_s for t in s1.turns] == pytest.approx([5.01, 0.05, 0.0])
    assert s1.turns[0].sandbox_bytes == 300 << 20 and s1.sandbox == "box1"


def test_missing_tool_durations_are_imputed_and_counted():
    loaded = sessions_from_trace(_trace(missing_end=True))
    assert loaded.imputed_durations == 1
    # Read has no other duration: the trace's median (5.0 s), cut at the next call (1 s later).
    assert loaded.sessions[0].turns[1].tool_s == pytest.approx(1.0)


def test_a_trace_without_llm_requests_is_refused():
    trace = _trace(False)
    trace.llm_requests = frame("llm_requests", [])
    with pytest.raises(TraceError, match="no LLM requests"):
        sessions_from_trace(trace)


def test_cost_model_presets_and_files(tmp_path):
    h200 = gpu_preset("H200")
    assert h200.bytes_per_token == 128 * 1024 and "datasheet" in h200.source
    path = tmp_path / "cost.json"
    path.write_text('{"step_fixed_s": 0.01, "token_s": 1e-4, "prefill_attn_s_per_token_pos": 1e-8, '
                    '"decode_kv_read_s_per_token": 1e-6, "bytes_per_token": 1024, "d2h_bytes_per_s": 1e9, '
                    '"h2d_bytes_per_s": 1e9, "ssd_write_bytes_per_s": 1e8, "ssd_read_bytes_per_s": 2e8}')
    assert load_engine_model(path).cost.token_s == 1e-4
    path.write_text('{"step_fixed_s": -1}')
    with pytest.raises(Exception, match="lacks"):
        load_engine_model(path)


def test_cli_simulates_a_trace(tmp_path, capsys):
    path = write_trace(_trace(False), tmp_path / "t")
    assert main(["kv", "simulate", str(path), "--policies", "vllm-v1,agentcg", "--gpu-kv", "1GiB"]) == 0
    out = capsys.readouterr().out
    assert "vllm-v1" in out and "agentcg" in out and "JCT p50" in out
    assert main(["kv", "simulate", str(path), "--policies", "nope"]) == 2
    assert main(["kv", "simulate", str(path), "--gpu-kv", "64MiB"]) == 2       # under 1,024 tokens
    assert "raise --gpu-kv" in capsys.readouterr().err


def test_cli_sweeps_and_writes_a_heat_map(tmp_path, capsys):
    path = write_trace(_trace(False), tmp_path / "t")
    png = tmp_path / "sweep.png"
    assert main(["kv", "sweep", str(path), "--fractions", "0.5", "--png", str(png)]) == 2   # one call cannot fit
    assert "raise --gpu-kv" in capsys.readouterr().err
    assert main(["kv", "sweep", str(path), "--fractions", "2,4", "--spacings", "0", "--budgets", "8GiB",
                 "--workers", "1", "--png", str(png)]) == 0
    out = capsys.readouterr().out
    assert "best baseline" in out and "over 2 points" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["kv", "sweep", str(path), "--fractions", "0", "--png", str(png)]) == 2
    assert main(["kv", "sweep", str(path), "--budgets", "lots", "--png", str(png)]) == 2
    assert main(["kv", "simulate", str(path), "--policies", "vllm-v1-offload:roomy"]) == 2
    assert "unknown KV policy vllm-v1-offload:roomy" in capsys.readouterr().err


def test_cli_real_runs_the_reference_engine_on_scaled_sessions(tmp_path, capsys):
    """The reference engine on this host's CPU (a GPU is used where torch sees one)."""
    pytest.importorskip("agentcg.gpu.engine.run")
    path = write_trace(_trace(False), tmp_path / "t")
    assert main(["kv", "simulate", str(path), "--real", "--policies", "vllm-v1,agentcg",
                 "--real-max-context", "96", "--real-max-output", "4"]) == 0
    out = capsys.readouterr().out
    assert "reference engine" in out and "agentcg" in out and "device>host" in out


def test_the_agentcgroup_sessions(dataset_dir):
    loaded = load_sessions(dataset_dir)
    assert len(loaded.sessions) == 111 and len(loaded.skipped) == 2
    assert sum(len(s.turns) for s in loaded.sessions) == 5643
    sessions = loaded.sessions[:6]
    cfg = build_config(sessions, gpu_preset("h200"))
    results = [simulate(sessions, name, cfg) for name in POLICY_NAMES]
    assert all(len(r.jct_s) == 6 and r.policy_errors == 0 for r in results)
    assert "continuum-paper" in format_table(results)
