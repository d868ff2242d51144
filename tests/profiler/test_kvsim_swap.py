"""The simulator's partial swaps (InferCept's): a later swap keeps the host copy an earlier
one left, and moves only what that copy lacks. Hand-built state on a real Simulator."""
from __future__ import annotations

import pytest

from agentcg.engine_protocol import Action, ComputeCost, Directive
from agentcg.profiler.kvsim import PAUSED, SimConfig, Simulator
from agentcg.profiler.kvsim_cost import EngineModel
from agentcg.profiler.kvsim_sessions import SimSession, SimTurn

COST = ComputeCost(step_fixed_s=0.01, token_s=1e-4, prefill_attn_s_per_token_pos=1e-8,
                   decode_kv_read_s_per_token=1e-6, max_batched_tokens=2048)
BPT = 1024
MODEL = EngineModel(COST, BPT, 1e9, 1e9, 1e8, 2e8, "test model")


def _paused(ctx: int, host: tuple[int, int] | None = None) -> tuple[Simulator, object]:
    cfg = SimConfig(MODEL, 100_000 * BPT, 10_000 * BPT, 10_000 * BPT)
    sim = Simulator([SimSession("a", "a", (SimTurn(ctx, 10, "Bash", 1.0), SimTurn(ctx + 100, 10, None, 0.0)))],
                    "infercept", cfg)   # a policy with a host pool
    s = sim.by_id["a"]
    s.state, s.ctx, s.hwm = PAUSED, ctx, ctx
    sim._gpu_set(s, ctx if host is None else host[0])
    if host is not None:
        sim._set_host(s, host)
    return sim, s


def _swap(sim: Simulator, s, tokens: int | None) -> None:
    sim._apply(Directive(s.rid, Action.SWAP_TO_HOST, tokens=tokens))
    sim.now = max(sim.now, s.host_ready)
    sim._handle("release", s, s.epoch)


@pytest.mark.parametrize("ctx, host, swaps, want_g, want_host, want_moved", [
    (1000, None, [160], 840, (840, 1000), 160),
    (1000, None, [160, 160], 680, (680, 1000), 320),          # the second one merged, not replaced
    (1000, None, [160, 160, 160], 520, (520, 1000), 480),
    (1000, None, [160, None], 0, (0, 1000), 1000),            # then the rest
    (1000, (900, 1000), [50], 850, (850, 1000), 50),          # host copy starts at g: merge
    (1000, (700, 1000), [200], 500, (500, 1000), 200),
])
def test_a_partial_swap_merges_with_the_host_copy_it_touches(ctx, host, swaps, want_g, want_host, want_moved):
    sim, s = _paused(ctx, host)
    for tokens in swaps:
        _swap(sim, s, tokens)
    assert sim.result.refused_directives == 0
    assert (s.g, s.host) == (want_g, want_host)
    assert sim._recoverable(s) == ctx
    assert sim.links["gpu_to_host"].moved == want_moved * BPT
    assert sim.host_used == want_host[1] - want_host[0]
    assert sim.gpu_used == want_g
