"""The KV decision harness (policies/kv/harness.py): the fallback, its counters, the wake
clamp and the one definition of running_batch_tokens. Pure: policies written here."""
from __future__ import annotations

import math

import pytest

from agentcg.engine_protocol import Action, Directive, EventKind, RequestEvent, Tier
from agentcg.policies.kv.harness import MIN_WAKE_S, KvDecider, build_snapshot, clamp_wake, is_decoding
from agentcg.policies.kv.types import Decision, State, Trigger


class Answers:
    """A policy that answers `result` (or raises it, when it is an exception)."""
    name = "answers"
    shares_host_memory = True

    def __init__(self, result) -> None:
        self.result = result

    def decide(self, snap):
        if isinstance(self.result, BaseException):
            raise self.result
        return self.result

    def observe(self, event):
        if isinstance(self.result, BaseException):
            raise self.result

    def waiting_key(self, view):
        if isinstance(self.result, BaseException):
            raise self.result
        return (view.session_start_s,)


def _pressure(kv):
    running = [kv.view("A", State.RUNNING, admitted_s=0.0), kv.view("B", State.RUNNING, admitted_s=1.0)]
    return kv.snap(Trigger.PRESSURE, "A", running, need_tokens=16)


VLLM_VICTIM = (Directive("B", Action.PREEMPT, tier=Tier.GPU),)
OWN = Decision((Directive("A", Action.KEEP),))


@pytest.mark.parametrize("answer, directives, errors, fallbacks, error_text", [
    (OWN, OWN.directives, 0, 0, None),                                      # a valid decision passes
    (RuntimeError("boom"), VLLM_VICTIM, 1, 1, "answers.decide: RuntimeError: boom"),
    (None, VLLM_VICTIM, 1, 1, "returned NoneType"),                         # not a Decision
    (Decision(("keep",)), VLLM_VICTIM, 1, 1, "not a Decision of Directives"),   # not Directives
    ((Directive("A", Action.KEEP),), VLLM_VICTIM, 1, 1, "returned tuple"),
])
def test_decide_never_raises_and_counts_the_fallback(answer, directives, errors, fallbacks, error_text, kv):
    decider = KvDecider(Answers(answer))
    decision = decider.decide(_pressure(kv))
    assert decision.directives == directives
    assert (decider.errors, decider.fallbacks) == (errors, fallbacks)
    if error_text is None:
        assert decider.last_error is None
    else:
        assert error_text in decider.last_error


def test_a_failing_fallback_gives_no_decision(kv):
    decider = KvDecider(Answers(RuntimeError("policy")), fallback=Answers(ValueError("fallback")))
    assert decider.decide(_pressure(kv)).directives == ()
    assert (decider.errors, decider.fallbacks) == (1, 1)
    assert "fallback answers.decide: ValueError" in decider.last_error


def test_observe_and_waiting_key_failures_are_counted_not_raised(kv):
    decider = KvDecider(Answers(KeyError("x")))
    decider.observe(RequestEvent("A", "A", EventKind.PAUSED, 1.0, 10))
    key = decider.waiting_key(kv.view("A", State.WAITING, arrival_s=7.0))
    assert key == (1, (7.0,))
    assert decider.errors == 2 and decider.fallbacks == 0
    good = KvDecider(Answers(OWN))
    assert good.waiting_key(kv.view("A", State.WAITING, session_start_s=3.0)) == (0, (3.0,))
    assert (good.name, good.shares_host_memory) == ("answers", True)


@pytest.mark.parametrize("wake, now, expected", [
    (None, 100.0, None),
    (math.inf, 100.0, None),
    (math.nan, 100.0, None),
    (True, 100.0, None),                    # a bool is not a time
    (50.0, 100.0, 100.0 + MIN_WAKE_S),      # in the past: soon, not at once
    (100.0, 100.0, 100.0 + MIN_WAKE_S),
    (105.5, 100.0, 105.5),
])
def test_wake_clamp(wake, now, expected):
    assert clamp_wake(wake, now) == expected


def test_the_decider_keeps_the_earliest_pending_wake_until_it_is_taken(kv):
    policy = Answers(Decision((), wake_at_s=110.0))
    decider = KvDecider(policy)
    assert decider.decide(kv.snap(Trigger.TICK, None, [])).wake_at_s == 110.0
    policy.result = Decision((), wake_at_s=120.0)
    decider.decide(kv.snap(Trigger.TICK, None, []))
    assert decider.wake_at_s == 110.0                   # a later wake does not replace an earlier one
    policy.result = Decision((), wake_at_s=99.0)       # asked for the past: clamped
    assert decider.decide(kv.snap(Trigger.TICK, None, [])).wake_at_s == 100.0 + MIN_WAKE_S
    assert not decider.take_wake(100.0)
    assert decider.take_wake(100.5) and decider.wake_at_s is None and not decider.take_wake(100.5)


@pytest.mark.parametrize("computed, prompt, decoding", [(999, 1000, False), (1000, 1000, True), (1005, 1000, True)])
def test_is_decoding(computed, prompt, decoding):
    assert is_decoding(computed, prompt) is decoding


def test_build_snapshot_has_one_definition_of_the_running_batch(kv):
    views = [
        kv.view("D1", State.RUNNING, gpu_tokens=500, decoding=True),
        kv.view("D2", State.RUNNING, gpu_tokens=700, decoding=True),
        kv.view("P", State.RUNNING, gpu_tokens=300, decoding=False),      # prefilling: not in the batch
        kv.view("W", State.WAITING, gpu_tokens=900, decoding=True),       # not running: ignored
        kv.view("Z", State.PAUSED, gpu_tokens=1000),
    ]
    snap = build_snapshot(now_s=5.0, trigger=Trigger.PAUSE, subject="Z", views=reversed(views),
                          bytes_per_token=kv.BPT, gpu_capacity_tokens=10_000, gpu_free_tokens=-3,
                          gpu_evictable_tokens=10, host_capacity_bytes=8 << 30, host_used_bytes=1 << 30,
                          ssd_capacity_bytes=0, ssd_used_bytes=0, bandwidths=list(kv.BW), cost=kv.COST,
                          host_share_bytes=2 << 30)
    assert snap.running_batch_tokens == 2
    assert snap.running_kv_tokens == 1500
    assert [v.request_id for v in snap.requests] == ["D1", "D2", "P", "W", "Z"]
    assert snap.gpu_free_tokens == 0
    assert snap.host_capacity_bytes == 2 << 30 and snap.host_free_bytes == 1 << 30
    assert snap.bandwidths == kv.BW
