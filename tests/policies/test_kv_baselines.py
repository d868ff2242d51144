"""The baselines users already have: vllm-v1-priority (`--scheduling-policy priority`),
vllm-v1-offload (native CPU offloading: store a finished turn, LRU, fixed pool) and
Continuum with that pool (its paper's reload term becomes a host->GPU transfer).
Hand-computed steps on hand-built snapshots."""
from __future__ import annotations

import pytest

from agentcg.engine_protocol import Action, Directive, EventKind, RequestEvent, Tier
from agentcg.policies.kv import POLICY_NAMES, make_policy
from agentcg.policies.kv.types import State, Trigger


def test_every_baseline_is_named():
    for name in ("vllm-v1-priority", "vllm-v1-offload", "continuum", "continuum-paper", "infercept", "agentcg"):
        assert name in POLICY_NAMES and make_policy(name).name == name


@pytest.mark.parametrize("running, victim", [
    # priority = the session's order: the largest (priority, arrival) goes, i.e. the youngest session
    ([("A", 0, 5.0), ("B", 2, 1.0), ("C", 1, 9.0)], "B"),
    # equal priorities: the later arrival
    ([("A", 1, 5.0), ("B", 1, 1.0)], "A"),
])
def test_priority_preempts_the_least_important_session(kv, running, victim):
    views = [kv.view(rid, State.RUNNING, priority=p, arrival_s=a, admitted_s=a) for rid, p, a in running]
    decision = make_policy("vllm-v1-priority").decide(kv.snap(Trigger.PRESSURE, running[0][0], views, need_tokens=16))
    assert decision.directives == (Directive(victim, Action.PREEMPT, tier=Tier.GPU),)


def _offload_with_lru(order: list[str]):
    policy = make_policy("vllm-v1-offload")
    for i, rid in enumerate(order):               # stored (paused) in this order: the first is the LRU
        policy.observe(RequestEvent(rid, rid, EventKind.PAUSED, float(i), 1000))
    return policy


KEEP_A = Directive("A", Action.KEEP, ttl_s=0.0)
STORE_A = Directive("A", Action.SWAP_TO_HOST, keep_gpu_copy=True)


@pytest.mark.parametrize("pool, holders, a_gpu, a_host, expected", [
    # room in the pool: the finished turn's blocks go to host, the GPU copy to the prefix cache
    (10_000, [], 2000, 0, (KEEP_A, STORE_A)),
    # a pool of 3,000 tokens holding X, Y, Z (1,000 each, X least recently used): storing
    # A's 1,500 needs 1,500 free: X and Y go (LRU first), Z stays
    (3000, [("X", 1000), ("Y", 1000), ("Z", 1000)], 1500, 0,
     (KEEP_A, Directive("X", Action.DISCARD, tier=Tier.HOST), Directive("Y", Action.DISCARD, tier=Tier.HOST), STORE_A)),
    # A already has 1,000 on host: re-storing its 1,600 needs only 600 more, which X's eviction gives
    (2500, [("X", 1000), ("Y", 500)], 1600, 1000,
     (KEEP_A, Directive("X", Action.DISCARD, tier=Tier.HOST), STORE_A)),
    # a turn bigger than the whole pool is not stored; nothing is evicted for it
    (1000, [("X", 500)], 2000, 0, (KEEP_A,)),
    # the host already has all of it: nothing to write
    (10_000, [], 2000, 2000, (KEEP_A,)),
])
def test_native_offloading_stores_a_finished_turn_evicting_lru(kv, pool, holders, a_gpu, a_host, expected):
    policy = _offload_with_lru([rid for rid, _ in holders] + ["A"])
    views = [kv.view(rid, gpu_tokens=0, context_tokens=n, host_tokens=n) for rid, n in holders]
    views.append(kv.view("A", gpu_tokens=a_gpu, host_tokens=a_host))
    used = sum(n for _, n in holders) + a_host
    snap = kv.snap(Trigger.PAUSE, "A", views, host_capacity_bytes=pool * kv.BPT, host_used_bytes=used * kv.BPT)
    assert policy.decide(snap).directives == expected


def test_a_hit_makes_a_copy_recently_used(kv):
    policy = _offload_with_lru(["X", "Y"])
    policy.observe(RequestEvent("X", "X", EventKind.ADMITTED, 5.0, 1000, cached_tokens=1000))   # X hit: Y is LRU now
    views = [kv.view("X", gpu_tokens=0, host_tokens=1000), kv.view("Y", gpu_tokens=0, host_tokens=1000),
             kv.view("A", gpu_tokens=1000)]
    snap = kv.snap(Trigger.PAUSE, "A", views, host_capacity_bytes=2000 * kv.BPT, host_used_bytes=2000 * kv.BPT)
    assert policy.decide(snap).directives == (KEEP_A, Directive("Y", Action.DISCARD, tier=Tier.HOST), STORE_A)


def test_offloading_preempts_like_vllm(kv):
    views = [kv.view("A", State.RUNNING, admitted_s=0.0), kv.view("B", State.RUNNING, admitted_s=1.0)]
    decision = make_policy("vllm-v1-offload").decide(kv.snap(Trigger.PRESSURE, "A", views, need_tokens=16))
    assert decision.directives == (Directive("B", Action.PREEMPT, tier=Tier.GPU),)


@pytest.mark.parametrize("name, host_gib, expected_keep", [
    # continuum-paper, cold start: Bn = T (0) + PrefillReload. 40,000 tokens with a host pool
    # reload in 40,000 x 128 KiB / 50 GB/s = 0.105 s <= mu (1 s): TTL 0 (prefix cache), stored.
    ("continuum-paper", 64, Directive("A", Action.KEEP, ttl_s=0.0)),
    # without room for the context in the pool, PrefillReload is the prefill: 5 chunks of
    # 8,192 x 5 ms + 40,000 x 30 us + 1.3e-9 x 40,000^2 / 2 = 2.265 s: TTL = ln(2.265) = 0.8176 s.
    ("continuum-paper", 0, Directive("A", Action.KEEP, ttl_s=pytest.approx(0.8176, abs=1e-3))),
    # the released rule ignores the reload: an unseen tool gets 2.0 s
    ("continuum", 64, Directive("A", Action.KEEP, ttl_s=2.0)),
])
def test_continuum_with_the_host_pool(kv, name, host_gib, expected_keep):
    policy = make_policy(name)
    view = kv.view("A", gpu_tokens=40_000, tool="Bash:pytest")
    snap = kv.snap(Trigger.PAUSE, "A", [view], host_capacity_bytes=host_gib << 30)
    directives = policy.decide(snap).directives
    assert directives[0] == expected_keep
    stored = Directive("A", Action.SWAP_TO_HOST, keep_gpu_copy=True)
    assert (stored in directives) == (host_gib > 0)
