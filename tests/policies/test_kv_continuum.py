"""continuum: the worked examples of kv-policies.md section 3, released code and paper rule."""
from __future__ import annotations

import math

import pytest

from agentcg.engine_protocol import Action, Directive, EventKind, RequestEvent, Tier
from agentcg.policies.kv.continuum import (ContinuumPolicy, cold_start_ttl_s, paper_ttl_s, released_ttl_s)
from agentcg.policies.kv.costs import prefill_time_s
from agentcg.policies.kv.types import State, Trigger


def _gap(policy, rid, tool, paused_at, resumed_at, tokens=1000):
    policy.observe(RequestEvent(rid, rid, EventKind.PAUSED, paused_at, tokens, tool=tool))
    policy.observe(RequestEvent(rid, rid, EventKind.RESUMED, resumed_at, tokens))


@pytest.mark.parametrize("history, tool, last, ttl", [
    ({"ls": [0.8, 1.6]}, "ls", False, 2.0),        # mean 1.2 s <= 2.0: pin 2.0 s
    ({"pytest": [25.0, 35.0]}, "pytest", False, 0.0),  # mean 30 s: no pin
    ({}, "make", False, 2.0),                      # unseen tool: 2.0 s
    ({"ls": [0.8, 1.6]}, "ls", True, 0.0),         # the final turn: 0
])
def test_released_rule(kv, history, tool, last, ttl):
    policy = ContinuumPolicy("released")
    for name, gaps in history.items():
        for i, gap in enumerate(gaps):
            _gap(policy, f"h{name}{i}", name, 10.0 * i, 10.0 * i + gap)
    decision = policy.decide(kv.snap(Trigger.PAUSE, "A", [kv.view("A", tool=tool, is_last_step=last)]))
    assert decision.directives == (Directive("A", Action.KEEP, ttl_s=ttl),)
    assert released_ttl_s(policy.mean_gap_s(tool), last) == ttl


def test_paper_rule_of_the_worked_example():
    # S[f] = {0.5, 1, 1.5, 4, 10}, T=2, eta=0.5, PrefillReload=4: benefit 5 s;
    # U = 0, 0.5, 1.0, 1.5, 0, -5 so tau* = 1.5 s.
    assert paper_ttl_s([0.5, 1, 1.5, 4, 10], 2 * 0.5 + 4) == 1.5


@pytest.mark.parametrize("benefit, tau", [(3.0, math.log(3.0)), (1.0, 0.0), (0.5, 0.0)])
def test_cold_start_with_the_exponential_prior(benefit, tau):
    assert cold_start_ttl_s(benefit) == pytest.approx(tau)
    assert cold_start_ttl_s(3.0) == pytest.approx(1.099, abs=1e-3)


def test_paper_policy_uses_the_cold_start_then_the_tools_own_cdf(kv):
    policy = ContinuumPolicy("paper")
    ctx = 40_000
    reload_s = prefill_time_s(kv.COST, ctx)
    pause = kv.snap(Trigger.PAUSE, "A", [kv.view("A", gpu_tokens=ctx, tool="Bash:pytest")])
    (cold,) = policy.decide(pause).directives
    assert cold.ttl_s == pytest.approx(math.log(reload_s))           # T=0 at first
    for i in range(101):                                             # 101 returns of pytest, 0.5 s each
        _gap(policy, f"p{i}", "Bash:pytest", 10.0 * i, 10.0 * i + 0.5)
    (warm,) = policy.decide(pause).directives
    assert warm.ttl_s == 0.5


def test_eta_is_minus_the_correlation_of_turn_and_turns_left():
    policy = ContinuumPolicy("paper")
    assert policy.eta() == 1.0                                       # no finished program yet
    for rid, turns in (("a", 2), ("b", 4)):
        for _ in range(turns - 1):
            policy.observe(RequestEvent(rid, rid, EventKind.PAUSED, 0.0, 10))
        policy.observe(RequestEvent(rid, rid, EventKind.FINISHED, 1.0, 10))
    # pairs (k, N-k): (1,1) (2,0) (1,3) (2,2) (3,1) (4,0)
    ks, ls = [1, 2, 1, 2, 3, 4], [1, 0, 3, 2, 1, 0]
    mk, ml = sum(ks) / 6, sum(ls) / 6
    cov = sum((k - mk) * (l - ml) for k, l in zip(ks, ls))
    corr = cov / math.sqrt(sum((k - mk) ** 2 for k in ks) * sum((l - ml) ** 2 for l in ls))
    assert policy.eta() == pytest.approx(-corr)


def test_victim_is_the_latest_admitted_job_skipping_last_steps(kv):
    policy = ContinuumPolicy()
    views = [kv.view("A", State.RUNNING, admitted_s=1.0), kv.view("B", State.RUNNING, admitted_s=2.0),
             kv.view("C", State.RUNNING, admitted_s=3.0, is_last_step=True)]
    decision = policy.decide(kv.snap(Trigger.PRESSURE, "A", views, need_tokens=16))
    assert decision.directives == (Directive("B", Action.PREEMPT, tier=Tier.GPU),)


def test_with_one_running_request_the_latest_deadline_pin_is_released(kv):
    policy = ContinuumPolicy()
    policy.decide(kv.snap(Trigger.PAUSE, "P1", [kv.view("P1", tool="ls")], now_s=10.0))
    policy.decide(kv.snap(Trigger.PAUSE, "P2", [kv.view("P2", tool="ls")], now_s=11.0))
    views = [kv.view("A", State.RUNNING, admitted_s=1.0), kv.view("P1", pinned=True), kv.view("P2", pinned=True)]
    decision = policy.decide(kv.snap(Trigger.PRESSURE, "A", views, need_tokens=16))
    assert decision.directives == (Directive("P2", Action.KEEP, ttl_s=0.0),)


def test_waiting_order_is_pinned_jobs_first_then_program_fcfs(kv):
    policy = ContinuumPolicy()
    views = [kv.view("late", State.WAITING, session_start_s=5.0),
             kv.view("early", State.WAITING, session_start_s=1.0),
             kv.view("pinned", State.WAITING, session_start_s=9.0, pinned=True)]
    assert [v.request_id for v in sorted(views, key=policy.waiting_key)] == ["pinned", "early", "late"]


def test_evicted_waits_feed_T(kv):
    policy = ContinuumPolicy("paper")
    _gap(policy, "A", "ls", 0.0, 1.0, tokens=2000)
    policy.observe(RequestEvent("A", "A", EventKind.ADMITTED, 4.0, 2100, cached_tokens=0))
    _gap(policy, "B", "ls", 0.0, 1.0, tokens=2000)
    policy.observe(RequestEvent("B", "B", EventKind.ADMITTED, 9.0, 2100, cached_tokens=1984))  # kept: not counted
    assert policy.queue_delay_s() == 3.0
