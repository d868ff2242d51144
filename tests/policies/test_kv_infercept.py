"""infercept: the worked example of kv-policies.md section 2 (6B constants, B=16)."""
from __future__ import annotations

import pytest

from agentcg.engine_protocol import Action, Directive, EventKind, RequestEvent, Tier
from agentcg.policies.kv.infercept import (InferceptParams, InferceptPolicy, discard_waste, preserve_waste,
                                           swap_budget_blocks)
from agentcg.policies.kv.types import State, Trigger

P6B = InferceptParams()
CTX = dict(running_batch_tokens=64, running_kv_tokens=64_000)


def test_discard_waste_of_the_worked_example(kv):
    # 2,000 tokens, running_batch=64, RT=64,000: c_h=320, k=6, r=80.
    assert discard_waste(P6B, 2000, 64, 64_000) == pytest.approx(186.68 + 5689.34 + 237.35, abs=0.02)
    assert discard_waste(P6B, 2000, 64, 64_000) == pytest.approx(6113.37, abs=0.02)


@pytest.mark.parametrize("remaining_s, expected", [(3.0, "preserve"), (4.0, "target")])
def test_pause_preserves_below_break_even_and_targets_above(remaining_s, expected, kv):
    policy = InferceptPolicy(P6B)
    decision = policy.decide(kv.snap(Trigger.PAUSE, "A", [kv.view("A", gpu_tokens=2000, tool_remaining_s=remaining_s)], **CTX))
    assert preserve_waste(remaining_s, 2000) == pytest.approx(remaining_s * 2000)
    # Both stay on the GPU; as the only candidate, A is the swap target, not discarded.
    assert decision.directives == (Directive("A", Action.KEEP),)
    assert policy.mode["A"] == expected
    assert (policy.target == "A") == (expected == "target")


def test_break_even_is_about_3_057_s(kv):
    policy = InferceptPolicy(P6B)
    decision = policy.decide(kv.snap(Trigger.PAUSE, "A", [kv.view("A", gpu_tokens=2000, tool_remaining_s=4.0)], **CTX))
    # It asks to be re-evaluated when W_p falls to W_d: R = 6113.37 / 2000 = 3.0567 s left.
    assert decision.wake_at_s == pytest.approx(100.0 + 4.0 - 3.0567, abs=1e-3)
    tick = policy.decide(kv.snap(Trigger.TICK, None, [kv.view("A", gpu_tokens=2000, tool_remaining_s=3.0)], now_s=101.0, **CTX))
    assert tick.directives == () and policy.mode["A"] == "preserve" and policy.target is None


def test_swap_budget_at_no_free_memory_is_30_blocks_out_and_6_in(kv):
    assert swap_budget_blocks(P6B, 0) == (30, 6)


def test_a_second_candidate_with_less_discard_waste_is_discarded(kv):
    policy = InferceptPolicy(P6B)
    big = kv.view("A", gpu_tokens=4000, tool_remaining_s=100.0)
    policy.decide(kv.snap(Trigger.PAUSE, "A", [big], **CTX))
    small = kv.view("B", gpu_tokens=2000, tool_remaining_s=100.0)
    decision = policy.decide(kv.snap(Trigger.PAUSE, "B", [big, small], **CTX))
    assert Directive("B", Action.DISCARD) in decision.directives
    assert policy.target == "A"


def test_pressure_swaps_the_targets_tail_within_the_budget_then_preempts_newest(kv):
    policy = InferceptPolicy(P6B)
    target = kv.view("A", gpu_tokens=2000, tool_remaining_s=10.0)
    policy.decide(kv.snap(Trigger.PAUSE, "A", [target], **CTX))
    running = [kv.view("R1", State.RUNNING, admitted_s=1.0), kv.view("R2", State.RUNNING, admitted_s=2.0)]
    first = policy.decide(kv.snap(Trigger.PRESSURE, "R1", [target, *running], need_tokens=100, **CTX))
    assert first.directives == (Directive("A", Action.SWAP_TO_HOST, tokens=112),)   # 7 blocks
    # 600 more tokens in the same iteration: 23 blocks of budget are left.
    second = policy.decide(kv.snap(Trigger.PRESSURE, "R1", [target, *running], need_tokens=600, **CTX))
    assert second.directives == (Directive("A", Action.SWAP_TO_HOST, tokens=23 * 16),)
    third = policy.decide(kv.snap(Trigger.PRESSURE, "R1", [target, *running], need_tokens=600, **CTX))
    assert third.directives == (Directive("R2", Action.PREEMPT, tier=Tier.NONE),)


def test_a_target_that_resumed_is_forgotten(kv):
    policy = InferceptPolicy(P6B)
    policy.decide(kv.snap(Trigger.PAUSE, "A", [kv.view("A", gpu_tokens=2000, tool_remaining_s=10.0)], **CTX))
    policy.observe(RequestEvent("A", "A", EventKind.ADMITTED, 101.0, 2100, cached_tokens=2000))
    assert policy.target is None


def test_calibration_follows_the_engine_cost_model(kv):
    params = InferceptParams.from_cost(kv.COST, 131072, 50e9, typical_context_tokens=10_000)
    assert params.chunk_tokens == kv.COST.max_batched_tokens
    assert params.a == pytest.approx((3e-5 + 1.3e-9 * 10_000) * 1000)
    assert params.c == pytest.approx(5.0)


@pytest.mark.parametrize("trigger, specs, discarded, target, preserved", [
    # Every paused request on the GPU is re-evaluated, not only the target.
    (Trigger.TICK, [("A", 2000, 1.0), ("B", 2000, 100.0), ("C", 4000, 100.0)], ["B"], "C", ["A"]),
    (Trigger.TICK, [("A", 2000, 1.0), ("B", 2000, 2.0)], [], None, ["A", "B"]),
    (Trigger.PRESSURE, [("B", 2000, 100.0), ("C", 4000, 100.0), ("D", 1000, 100.0)], ["D", "B"], "C", []),
])
def test_every_paused_request_is_reevaluated_each_iteration(trigger, specs, discarded, target, preserved, kv):
    policy = InferceptPolicy(P6B)
    views = [kv.view(rid, gpu_tokens=g, tool_remaining_s=r) for rid, g, r in specs]
    for v in views:
        policy.mode[v.request_id] = "preserve"     # as each paused with a long way to go earlier
    running = [kv.view("R", State.RUNNING, admitted_s=1.0)]
    decision = policy.decide(kv.snap(trigger, "R", views + running, need_tokens=100, **CTX))
    assert decision.directives == tuple(Directive(rid, Action.DISCARD) for rid in discarded)
    assert policy.target == target
    assert [rid for rid, _, _ in specs if policy.mode[rid] == "preserve"] == preserved
    if target is not None:
        t = next(v for v in views if v.request_id == target)
        w_d = discard_waste(P6B, t.gpu_tokens, 64, 64_000)
        assert decision.wake_at_s == pytest.approx(100.0 + 100.0 - w_d / t.gpu_tokens, abs=1e-3)
