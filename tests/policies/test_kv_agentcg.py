"""agentcg's KV policy, its tool-duration predictor and the shared host memory budget."""
from __future__ import annotations

import math

import pytest

from agentcg.engine_protocol import Action, Directive, EventKind, RequestEvent, Tier
from agentcg.policies.kv import make_policy
from agentcg.policies.kv.agentcg import AgentcgPolicy, HostMemoryBudget
from agentcg.policies.kv.predictor import ToolDurationPredictor, ToolPrediction, ToolSignal, remaining_s, tool_key
from agentcg.policies.kv.types import State, Trigger
from agentcg.errors import InvalidInput


@pytest.mark.parametrize("tool, command, key", [
    ("Bash", "/usr/bin/pytest -x tests", "Bash:pytest"),
    ("Bash", "  ", "Bash"),
    ("Read", "ignored", "Read"),
    (None, None, "unknown"),
])
def test_tool_key(tool, command, key):
    assert tool_key(tool, command) == key


def test_prediction_prefers_the_sandbox_then_the_tool_then_everything():
    p = ToolDurationPredictor()
    assert p.predict("s1", "Bash:pytest").source == "default"
    for d in (10.0, 12.0, 14.0):
        p.record("s2", "Bash:pytest", d)
    assert p.predict("s1", "Bash:pytest") == ToolPrediction(12.0, 14.0, 3, "tool")
    for d in (1.0, 2.0, 3.0):
        p.record("s1", "Bash:pytest", d)
    assert p.predict("s1", "Bash:pytest").source == "sandbox"
    assert p.predict("s1", "Bash:pytest").median_s == 2.0
    assert p.predict("s9", "Read").source == "global"


@pytest.mark.parametrize("elapsed, signal, left", [
    (1.0, None, 9.0),                  # before the median: until the median
    (15.0, None, 15.0),                # past the median: until the p90
    (40.0, None, 40.0),                # past the p90: as long again
    (1.0, ToolSignal.THROTTLED, 18.0),
    (1.0, ToolSignal.EXITED, 0.0),
    (1.0, ToolSignal.FROZEN, math.inf),
])
def test_remaining_time_follows_elapsed_time_and_live_signals(elapsed, signal, left):
    assert remaining_s(ToolPrediction(10.0, 30.0, 10, "tool"), elapsed, signal) == left


def _learn(policy, tool, durations, sandbox="sb"):
    for i, d in enumerate(durations):
        rid = f"{tool}{i}"
        policy.observe(RequestEvent(rid, rid, EventKind.PAUSED, 0.0, 10, sandbox=sandbox, tool=tool))
        policy.observe(RequestEvent(rid, rid, EventKind.RESUMED, d, 10))


def test_short_calls_keep_their_kv_long_calls_also_write_a_host_copy(kv):
    policy = AgentcgPolicy()
    _learn(policy, "Read", [0.02, 0.03, 0.04])
    _learn(policy, "Bash:pytest", [8.0, 9.0, 10.0])
    # Pinned for the predicted remaining time x 4 + 1 s: Read's median 0.03 s gives 1.12 s;
    # pytest's 9 s gives 37 s, and 9 s > MIN_COPY_S (5 s) and a round trip, so a host copy too.
    for tool, expected in (("Read", (Directive("A", Action.KEEP, ttl_s=pytest.approx(1.12)),)),
                           ("Bash:pytest", (Directive("A", Action.KEEP, ttl_s=37.0),
                                            Directive("A", Action.SWAP_TO_HOST, keep_gpu_copy=True)))):
        policy.observe(RequestEvent("A", "A", EventKind.PAUSED, 100.0, 40_000, sandbox="sb", tool=tool))
        a = kv.view("A", gpu_tokens=40_000, tool=tool, sandbox="sb", paused_s=100.0)
        assert policy.decide(kv.snap(Trigger.PAUSE, "A", [a])).directives == expected


def test_pressure_frees_backed_copies_of_the_longest_calls_first(kv):
    policy = AgentcgPolicy()
    _learn(policy, "Bash:pytest", [30.0, 30.0, 30.0])
    _learn(policy, "Bash:ls", [1.0, 1.0, 1.0])
    views = [
        kv.view("short", tool="Bash:ls", gpu_tokens=5000, host_tokens=5000, paused_s=99.0),
        kv.view("long", tool="Bash:pytest", gpu_tokens=5000, host_tokens=5000, paused_s=99.0),
        kv.view("R", State.RUNNING, admitted_s=1.0),
    ]
    for v in views[:2]:
        policy.observe(RequestEvent(v.request_id, v.request_id, EventKind.PAUSED, 99.0, 5000, tool=v.tool, sandbox=v.sandbox))
    decision = policy.decide(kv.snap(Trigger.PRESSURE, "R", views, need_tokens=4000))
    assert decision.directives == (Directive("long", Action.DISCARD, tier=Tier.GPU),)


@pytest.mark.parametrize("swap, expected", [
    # swapping under pressure: the copy frees the GPU when it lands, a round trip < the call
    (True, (Directive("P", Action.SWAP_TO_HOST),)),
    # the default: nothing else runs, so the kept KV of the longest call goes to the prefix cache
    (False, (Directive("P", Action.KEEP, ttl_s=0.0),)),
])
def test_unbacked_paused_kv_under_pressure(kv, swap, expected):
    policy = AgentcgPolicy(swap_under_pressure=swap, min_copy_s=0.2)
    views = [kv.view("P", tool="Read", gpu_tokens=5000, pinned=True, paused_s=99.0),
             kv.view("R", State.RUNNING, admitted_s=1.0)]
    decision = policy.decide(kv.snap(Trigger.PRESSURE, "R", views, need_tokens=4000))
    assert decision.directives == expected


def test_a_waiting_request_never_preempts_a_running_one(kv):
    policy = AgentcgPolicy()
    views = [kv.view("W", State.WAITING), kv.view("R", State.RUNNING, admitted_s=1.0)]
    assert policy.decide(kv.snap(Trigger.PRESSURE, "W", views, need_tokens=4000)).directives == ()
    running = policy.decide(kv.snap(Trigger.PRESSURE, "R", views + [kv.view("R2", State.RUNNING, admitted_s=2.0)],
                                    need_tokens=4000))
    assert running.directives == (Directive("R2", Action.PREEMPT, tier=Tier.HOST),)


def test_a_waiting_request_with_nothing_running_releases_the_longest_pins(kv):
    """Nothing runs, so nothing will free GPU memory for the queue's head: the pins of the
    calls that will last longest go (without this the engine would wait on its own pins)."""
    policy = AgentcgPolicy()
    _learn(policy, "Bash:pytest", [30.0, 30.0, 30.0])
    _learn(policy, "Bash:ls", [1.0, 1.0, 1.0])
    views = [kv.view("short", tool="Bash:ls", gpu_tokens=5000, pinned=True, paused_s=99.0),
             kv.view("long", tool="Bash:pytest", gpu_tokens=5000, pinned=True, paused_s=99.0),
             kv.view("W", State.WAITING, gpu_tokens=0)]
    for v in views[:2]:
        policy.observe(RequestEvent(v.request_id, v.request_id, EventKind.PAUSED, 99.0, 5000, tool=v.tool, sandbox=v.sandbox))
    decision = policy.decide(kv.snap(Trigger.PRESSURE, "W", views, need_tokens=4000))
    assert decision.directives == (Directive("long", Action.KEEP, ttl_s=0.0),)
    with_running = views + [kv.view("R", State.RUNNING, admitted_s=1.0)]
    assert policy.decide(kv.snap(Trigger.PRESSURE, "W", with_running, need_tokens=4000)).directives == ()


def test_host_pressure_moves_the_coldest_needed_copies_to_ssd_after_redundant_ones(kv):
    policy = AgentcgPolicy()
    _learn(policy, "Bash:pytest", [30.0, 30.0, 30.0])
    views = [kv.view("stale", State.RUNNING, gpu_tokens=8000, host_tokens=6000),
             kv.view("cold", tool="Bash:pytest", gpu_tokens=0, context_tokens=6000, host_tokens=6000, paused_s=99.0)]
    nbytes = 6000 * kv.BPT
    first = policy.decide(kv.snap(Trigger.HOST_PRESSURE, None, views, need_bytes=nbytes, ssd_capacity_bytes=1 << 40))
    assert first.directives == (Directive("stale", Action.DISCARD, tier=Tier.HOST),)
    second = policy.decide(kv.snap(Trigger.HOST_PRESSURE, None, views[1:], need_bytes=nbytes, ssd_capacity_bytes=1 << 40))
    assert second.directives == (Directive("cold", Action.OFFLOAD_TO_SSD),)


def test_prefetch_a_transfer_time_before_the_predicted_end_or_at_exit(kv):
    policy = AgentcgPolicy()
    _learn(policy, "Bash:pytest", [10.0, 10.0, 10.0])
    policy.observe(RequestEvent("A", "A", EventKind.PAUSED, 100.0, 40_000, sandbox="sb", tool="Bash:pytest"))
    a = kv.view("A", gpu_tokens=0, context_tokens=40_000, host_tokens=40_000, tool="Bash:pytest",
                sandbox="sb", paused_s=100.0)
    early = policy.decide(kv.snap(Trigger.TICK, None, [a], now_s=101.0, gpu_free_tokens=90_000))
    back_s = 40_000 * kv.BPT / 50e9
    assert early.directives == ()
    assert early.wake_at_s == pytest.approx(110.0 - back_s - 0.05)
    policy.signal("A", ToolSignal.EXITED)
    now = policy.decide(kv.snap(Trigger.TICK, None, [a], now_s=102.0, gpu_free_tokens=90_000))
    assert now.directives == (Directive("A", Action.PREFETCH),)


def test_host_memory_budget_shrinks_the_kv_pool_and_limits_sandboxes():
    budget = HostMemoryBudget(total_bytes=100, reserve_bytes=10, kv_floor_bytes=5)
    assert budget.kv_capacity_bytes(sandbox_bytes=30) == 60
    assert budget.kv_capacity_bytes(sandbox_bytes=95) == 5
    # KV uses 50, of which 20 could go to SSD: sandboxes (at 30) may grow by 90-30-30.
    assert budget.sandbox_headroom_bytes(30, kv_used_bytes=50, kv_spillable_bytes=20) == 30


def test_make_policy_refuses_unknown_names():
    with pytest.raises(InvalidInput, match="unknown KV policy"):
        make_policy("lru-ish")


def _host_full(kv, tokens: int) -> dict:
    return dict(host_capacity_bytes=tokens * kv.BPT, host_used_bytes=tokens * kv.BPT)


@pytest.mark.parametrize("views, host_tokens, need, expected", [
    # A's GPU copy goes because A has a host copy: that host copy is then A's only one.
    ([("A", State.PAUSED, 1000, 1000), ("B", State.PAUSED, 1000, 0)], 1000, 1500,
     (Directive("A", Action.DISCARD, tier=Tier.GPU), Directive("B", Action.KEEP, ttl_s=0.0))),
    # Each swap frees a different stale copy; none is freed twice, so D finds no room.
    ([("B", State.PAUSED, 1000, 0), ("C", State.PAUSED, 1000, 0), ("D", State.PAUSED, 1000, 0),
      ("H1", State.RUNNING, 2000, 1000), ("H2", State.RUNNING, 2000, 1000)], 2000, 5000,
     (Directive("H1", Action.DISCARD, tier=Tier.HOST), Directive("B", Action.SWAP_TO_HOST),
      Directive("H2", Action.DISCARD, tier=Tier.HOST), Directive("C", Action.SWAP_TO_HOST),
      Directive("H2", Action.PREEMPT, tier=Tier.GPU))),   # then the latest admitted (ties: by id)
])
def test_pressure_never_frees_both_copies_or_the_same_host_copy_twice(kv, views, host_tokens, need, expected):
    policy = AgentcgPolicy(swap_under_pressure=True, min_copy_s=0.2)
    built = [kv.view(rid, state, gpu_tokens=g, host_tokens=h, pinned=state is State.PAUSED,
                     paused_s=99.0 if state is State.PAUSED else None, admitted_s=1.0 if state is State.RUNNING else None)
             for rid, state, g, h in views]
    built.append(kv.view("R", State.RUNNING, admitted_s=0.5))
    decision = policy.decide(kv.snap(Trigger.PRESSURE, "R", built, need_tokens=need, **_host_full(kv, host_tokens)))
    assert decision.directives == expected
    named = [(d.request_id, d.tier) for d in decision.directives if d.action is Action.DISCARD]
    assert len(named) == len(set(named))
    for rid in {d.request_id for d in decision.directives}:
        tiers = {d.tier for d in decision.directives if d.request_id == rid and d.action is Action.DISCARD}
        assert tiers != {Tier.GPU, Tier.HOST}, f"both copies of {rid} discarded"
