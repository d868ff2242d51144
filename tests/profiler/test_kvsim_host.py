"""Host memory in the KV simulator (profiler/kvsim_host.py): sandboxes along their
recorded curves share one budget with the KV pool; a burst meeting an optimistic fixed
pool OOM-kills the sandbox (its call repeated); a pool that follows the sandboxes gives
way instead. And the shared prefix, stored once per tier. Real Simulator, hand-made
sessions; hand-computed times."""
from __future__ import annotations

import pytest

from agentcg.engine_protocol import Action, ComputeCost, Directive
from agentcg.policies.kv.types import NO_DECISION, Decision, Trigger
from agentcg.profiler.kvsim import PAUSED, SimConfig, Simulator, simulate
from agentcg.profiler.kvsim_cost import EngineModel
from agentcg.profiler.kvsim_report import build_config, pool_bytes, run_one
from agentcg.profiler.kvsim_sessions import SimSession, SimTurn, estimate_shared_prefix_tokens

COST = ComputeCost(step_fixed_s=0.01, token_s=1e-4, prefill_attn_s_per_token_pos=1e-8,
                   decode_kv_read_s_per_token=1e-6, max_batched_tokens=2048)
BPT = 1024
MODEL = EngineModel(COST, BPT, 1e9, 1e9, 1e8, 2e8, "test model")
GIB = 1 << 30


def _bursty(name: str = "b") -> SimSession:
    """A 4 s tool call: 1 GiB at rest, a 5 GiB burst from 1 s to 3 s; 1 GiB mean, 5 GiB peak."""
    burst = SimTurn(1000, 5, "Bash:pytest", 4.0, 5 * GIB, ((0.0, GIB), (1.0, 5 * GIB), (3.0, GIB)), GIB)
    return SimSession(name, name, (burst, SimTurn(1100, 5, None, 0.0, GIB, (), None)),
                      peak_memory_bytes=5 * GIB, mean_memory_bytes=GIB)


def _config(pool: str, budget: int = 10 * GIB) -> SimConfig:
    return build_config([_bursty()], MODEL, gpu_kv_bytes=100_000 * BPT, host_memory_bytes=budget, ssd_bytes=0,
                        host_pool=pool, shared_prefix_tokens=0)


@pytest.mark.parametrize("pool, expected", [("safe", 10 - 5), ("optimistic", 10 - 1)])
def test_fixed_pools_are_sized_from_the_sandboxes_peaks_or_means(pool, expected):
    assert pool_bytes([_bursty()], 10 * GIB, pool) == expected * GIB


@pytest.mark.parametrize("spec, kills, failed, extra_s", [
    # safe pool (5 GiB): the sandbox may use 5 GiB, its burst fits
    ("vllm-v1-offload:safe", 0, 0, 0.0),
    # optimistic pool (9 GiB): the sandbox may use 1 GiB; the burst at 1 s kills it, the call
    # starts again, 3 times (3 x 1 s lost); the 4th kill gives the call up (it goes on)
    ("vllm-v1-offload:optimistic", 4, 1, 3.0),
    # vllm-v1 reserves no pool: the whole budget is the sandboxes'
    ("vllm-v1:optimistic", 0, 0, 0.0),
    # agentcg's pool follows the sandboxes: nothing to kill
    ("agentcg", 0, 0, 0.0),
])
def test_a_burst_meeting_an_optimistic_pool_oom_kills_and_repeats_the_call(spec, kills, failed, extra_s):
    base = run_one([_bursty()], "vllm-v1", _config("safe"))
    result = run_one([_bursty()], spec, _config("safe"))
    assert (result.sandbox_oom_kills, result.failed_calls) == (kills, failed)
    assert result.jct_s[0] - base.jct_s[0] == pytest.approx(extra_s, abs=0.02)
    assert result.peak_sandbox_bytes == 5 * GIB


class _Stubborn:
    """Shares host memory but never gives any back: the simulator spills by force."""
    name = "stubborn"
    shares_host_memory = True

    def decide(self, snap):
        if snap.trigger is Trigger.PAUSE:
            return Decision((Directive(snap.subject, Action.KEEP),
                             Directive(snap.subject, Action.SWAP_TO_HOST, keep_gpu_copy=True)))
        return NO_DECISION

    def observe(self, event):
        return None

    def waiting_key(self, view):
        return (view.arrival_s,)


def test_a_pool_that_does_not_give_way_is_spilled_by_force():
    # 6 GiB budget: the 1,004-token KV (about 1 MiB) is copied at the pause; the burst to
    # 5 GiB leaves 1 GiB, still room; at 5.999 GiB the copy must go.
    session = _bursty()
    turns = (session.turns[0].__class__(1000, 5, "Bash:pytest", 4.0, 6 * GIB - 1024,
                                        ((0.0, GIB), (1.0, 6 * GIB - 1024), (3.0, GIB)), GIB), session.turns[1])
    session = SimSession("b", "b", turns, 6 * GIB, GIB)
    cfg = build_config([session], MODEL, gpu_kv_bytes=100_000 * BPT, host_memory_bytes=6 * GIB, ssd_bytes=0,
                       shared_prefix_tokens=0)
    result = simulate([session], _Stubborn(), cfg)
    assert result.sandbox_oom_kills == 0
    assert result.forced_spill_bytes == 1004 * BPT and result.forced_spills == 1 and result.fallbacks == 0
    assert result.bytes_moved["host_to_gpu"] == 0          # the copy was gone when the call came back


@pytest.mark.parametrize("sessions, prefix", [
    ([(13_214, 20), (13_300, 20), (14_000, 20)], 13_200),    # the smallest first prompt - 1, in blocks
    ([(1000, 5)], 0),                                         # one session shares nothing
])
def test_the_shared_prefix_is_estimated_from_the_first_prompts(sessions, prefix):
    built = [SimSession(f"s{i}", f"s{i}", (SimTurn(n, o, None, 0.0),)) for i, (n, o) in enumerate(sessions)]
    assert estimate_shared_prefix_tokens(built) == prefix


def test_the_shared_prefix_is_computed_once_and_attended_by_every_step():
    # 1,512-token prompt, 512 of them the shared prefix: 1,000 are prefilled, each attending
    # over the prefix too; every decode step reads the prefix's KV.
    cfg = SimConfig(MODEL, 100_000 * BPT, 0, 0, shared_prefix_tokens=512)
    result = simulate([SimSession("a", "a", (SimTurn(1512, 3, None, 0.0),))], "vllm-v1", cfg)
    prefill = 0.01 + 1000 * 1e-4 + 1e-8 * (1000 * 500 + 1000 * 512)
    decode = [0.01 + 1e-4 + 1e-6 * (ctx + 512) for ctx in (1001, 1002)]
    assert result.jct_s == [pytest.approx(prefill + sum(decode))]
    assert result.prefilled_tokens == 1000


def test_the_shared_prefix_is_stored_once_per_tier():
    cfg = SimConfig(MODEL, 100_000 * BPT, 1_000_000 * BPT, 1_000_000 * BPT, 1_000_000 * BPT, shared_prefix_tokens=512)
    sessions = [SimSession(n, n, (SimTurn(2000, 5, "Bash", 1.0), SimTurn(2100, 5, None, 0.0))) for n in "abc"]
    sim = Simulator(sessions, "vllm-v1-offload", cfg)
    assert sim.cap == 100_000 - 512                       # resident on the GPU once
    held = {"a": 900, "b": 1000, "c": 1100}
    for name, tokens in held.items():
        s = sim.by_id[name]
        s.state, s.ctx = PAUSED, tokens
        sim._set_host(s, (0, tokens))
    assert sim.host_used == sum(held.values()) + 512       # the prefix once, not three times
    sim._set_ssd(sim.by_id["a"], (0, 900))
    sim._set_ssd(sim.by_id["b"], (0, 1000))
    assert sim.ssd_used == 1900 + 512
    sim._set_host(sim.by_id["a"], None)
    sim._set_host(sim.by_id["b"], None)
    assert sim.host_used == 1100 + 512                     # c still holds the prefix's host copy
    sim._set_host(sim.by_id["c"], (100, 1100))             # a copy not from token 0 holds none of it
    assert sim.host_used == 1000
