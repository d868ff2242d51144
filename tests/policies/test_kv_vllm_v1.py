"""vllm-v1: the worked examples of kv-policies.md section 1 (scheduler.py _preempt_request)."""
from __future__ import annotations

import pytest

from agentcg.engine_protocol import Action, Directive, Tier
from agentcg.policies.kv.types import State, Trigger
from agentcg.policies.kv.vllm_v1 import VllmV1Policy, prefix_hit_tokens


def _running(kv, *specs):
    return [kv.view(rid, State.RUNNING, admitted_s=adm, arrival_s=arr, priority=prio) for rid, adm, arr, prio in specs]


@pytest.mark.parametrize("mode, specs, victim", [
    # fcfs, running=[A,B,C], 0 free blocks, A needs 1 block: the newest admitted, C.
    ("fcfs", [("A", 0.0, 0.0, 0), ("B", 1.0, 1.0, 0), ("C", 2.0, 2.0, 0)], "C"),
    # priority with A=(0,0), B=(5,1), C=(1,2): the largest (priority, arrival) is B.
    ("priority", [("A", 0.0, 0.0, 0), ("B", 1.0, 1.0, 5), ("C", 2.0, 2.0, 1)], "B"),
    # the requester itself may be the newest: it is the victim then.
    ("fcfs", [("A", 5.0, 0.0, 0)], "A"),
])
def test_pressure_preempts_one_victim_into_the_prefix_cache(mode, specs, victim, kv):
    policy = VllmV1Policy(mode)
    decision = policy.decide(kv.snap(Trigger.PRESSURE, "A", _running(kv, *specs), need_tokens=16))
    assert decision.directives == (Directive(victim, Action.PREEMPT, tier=Tier.GPU),)


def test_a_waiting_request_preempts_no_one(kv):
    views = _running(kv, ("A", 0.0, 0.0, 0)) + [kv.view("W", State.WAITING)]
    assert VllmV1Policy().decide(kv.snap(Trigger.PRESSURE, "W", views, need_tokens=16)).directives == ()


def test_a_pause_frees_the_blocks_to_the_prefix_cache(kv):
    decision = VllmV1Policy().decide(kv.snap(Trigger.PAUSE, "A", [kv.view("A")]))
    assert decision.directives == (Directive("A", Action.KEEP, ttl_s=0.0),)


@pytest.mark.parametrize("cached, prompt, hit", [
    (1000, 1000, 992),   # a 1,000-token C whose blocks were kept: hits 992, recomputes 8
    (0, 1000, 0),        # prefix caching off (or every block reused): recomputes 1,000
    (1000, 1200, 992),
    (15, 1000, 0),
])
def test_prefix_hits_are_whole_blocks_and_at_most_prompt_minus_one(cached, prompt, hit, kv):
    assert prefix_hit_tokens(cached, prompt, 16) == hit


@pytest.mark.parametrize("mode, priorities, expected", [
    # fcfs: preempted requests go to the head of the deque, the latest first.
    ("fcfs", (0, 0, 0), ["P2", "P1", "N"]),
    # priority: one heap on (priority, arrival); being preempted moves no one ahead.
    ("priority", (0, 0, 0), ["N", "P1", "P2"]),
    ("priority", (1, 0, 2), ["P1", "N", "P2"]),
    ("priority", (1, 1, 0), ["P2", "N", "P1"]),
])
def test_preempted_requests_reenter_the_waiting_queue_by_mode(mode, priorities, expected, kv):
    policy = VllmV1Policy(mode)
    new = kv.view("N", State.WAITING, arrival_s=1.0, priority=priorities[0])
    old_preempted = kv.view("P1", State.WAITING, arrival_s=5.0, preempted_s=10.0, priority=priorities[1])
    new_preempted = kv.view("P2", State.WAITING, arrival_s=6.0, preempted_s=11.0, priority=priorities[2])
    order = sorted([new, old_preempted, new_preempted], key=policy.waiting_key)
    assert [v.request_id for v in order] == expected


def test_unknown_mode_is_refused(kv):
    with pytest.raises(ValueError, match="mode"):
        VllmV1Policy("sjf-ish")
