"""The daemon's engine links without a socket: snapshot building (table-driven), the event
table, EngineLink decisions with the real KV policies, and the [engine] config."""
from __future__ import annotations

import pytest

from agentcg.controller.daemon import engine_state as es
from agentcg.controller.daemon.config import parse_config
from agentcg.controller.daemon.engine import EngineHub, read_records_tail
from agentcg.controller.daemon.engine_counters import EngineCounters
from agentcg.controller.daemon.engine_link import EngineLink
from agentcg.engine_protocol import (
    Action, Bandwidth, Directive, DirectiveResult, EventKind, KvGeometry, KvUsage, Register, RequestEvent, Tier,
    TierCapacity,
)
from agentcg.errors import InvalidInput, ProtocolError
from agentcg.policies.kv.types import State, Trigger
from agentcg.records import ToolCallRecord

GEOMETRY = KvGeometry(layers=2, kv_heads=2, head_dim=64, dtype_bytes=2)     # 1 KiB per token
BPT = GEOMETRY.bytes_per_token
REG = Register("eng", "test-model", GEOMETRY,
               (TierCapacity(Tier.GPU, 1000 * BPT), TierCapacity(Tier.HOST, 2000 * BPT),
                TierCapacity(Tier.SSD, 500 * BPT)),
               (Bandwidth(Tier.GPU, Tier.HOST, 1e9), Bandwidth(Tier.HOST, Tier.GPU, 1e9)))


def _req(rid, state, gpu=0, host=0, ssd=0, ctx=None, pinned=False, sandbox="S"):
    return es.EngineRequest(rid, rid, sandbox, state, 0.0, 0.0, context_tokens=ctx or max(gpu, host, ssd),
                            gpu_tokens=gpu, host_tokens=host, ssd_tokens=ssd, pinned=pinned)


@pytest.mark.parametrize("requests, free, evictable, host_used, host_spillable, ssd_used", [
    ([], 1000, 0, 0, 0, 0),
    ([_req("a", State.RUNNING, gpu=300)], 700, 0, 0, 0, 0),
    ([_req("a", State.PAUSED, gpu=300), _req("b", State.PAUSED, gpu=200, pinned=True)], 500, 300, 0, 0, 0),
    # a host copy whose GPU copy is whole is spillable for free; the rest up to the SSD's room
    ([_req("a", State.PAUSED, gpu=100, host=100), _req("b", State.PAUSED, host=800)],
     900, 100, 900 * BPT, 600 * BPT, 0),
    ([_req("a", State.WAITING, ssd=400, host=100)], 1000, 0, 100 * BPT, 100 * BPT, 400 * BPT),
    ([_req("a", State.RUNNING, gpu=1200)], 0, 0, 0, 0, 0),      # over-reported: free never negative
])
def test_snapshot_from_the_request_table(requests, free, evictable, host_used, host_spillable, ssd_used):
    snap = es.build_snapshot(REG, requests, 5.0, Trigger.TICK)
    assert (snap.gpu_capacity_tokens, snap.gpu_free_tokens, snap.gpu_evictable_tokens) == (1000, free, evictable)
    assert (snap.host_capacity_bytes, snap.host_used_bytes, snap.ssd_used_bytes) == (2000 * BPT, host_used, ssd_used)
    assert es.host_bytes(REG, requests) == (host_used, host_spillable)
    assert [v.request_id for v in snap.requests] == sorted(r.request_id for r in requests)
    assert snap.bytes_per_token == BPT and snap.cost == es.DEFAULT_COST and snap.now_s == 5.0
    assert es.build_snapshot(REG, requests, 5.0, Trigger.TICK, host_capacity_bytes=7).host_capacity_bytes == 7


@pytest.mark.parametrize("kinds, state, turn", [
    ([EventKind.ADMITTED], State.RUNNING, 0),
    ([EventKind.ADMITTED, EventKind.PAUSED], State.PAUSED, 0),
    ([EventKind.ADMITTED, EventKind.PAUSED, EventKind.RESUMED], State.WAITING, 1),
    ([EventKind.ADMITTED, EventKind.PREEMPTED], State.WAITING, 0),
    ([EventKind.PAUSED], State.PAUSED, 0),                      # attached late: any event adds it
    ([EventKind.ADMITTED, EventKind.FINISHED], None, None),
])
def test_event_table(kinds, state, turn):
    table: dict = {}
    for i, kind in enumerate(kinds):
        es.apply_event(table, RequestEvent("r", "s", kind, 0.0, 100 + i, sandbox="S", tool="pytest"), float(i))
    if state is None:
        assert table == {}
        return
    r = table["r"]
    assert (r.state, r.turn, r.context_tokens, r.sandbox) == (state, turn, 99 + len(kinds), "S")
    assert (r.paused_s is not None) == (state is State.PAUSED)


@pytest.mark.parametrize("reg, words", [
    (Register("e", "m", KvGeometry(0, 1, 1, 2), (TierCapacity(Tier.GPU, 1),), ()), "0 bytes per token"),
    (Register("e", "m", GEOMETRY, (TierCapacity(Tier.HOST, 1),), ()), "gpu tier"),
    (Register("e", "m", GEOMETRY, (TierCapacity(Tier.GPU, 1), TierCapacity(Tier.GPU, 2)), ()), "twice"),
])
def test_bad_registrations_are_refused(reg, words):
    with pytest.raises(ProtocolError, match=words):
        es.check_register(reg)


def _link(policy="agentcg", max_requests=16, calls_of=None):
    link = EngineLink(1, 3, policy, EngineCounters(), max_requests, calls_of)
    link.on_message(REG, 0.0)
    return link


def _admit(link, rid="r1", sandbox="S", ctx=600, gpu=600, now=1.0):
    link.on_message(RequestEvent(rid, rid, EventKind.ADMITTED, 99.0, ctx, sandbox=sandbox), now)
    link.on_message(KvUsage(rid, 99.0, gpu), now)


def test_tool_call_pauses_the_sandboxes_requests_and_its_end_prefetches():
    link = _link()
    _admit(link)
    _admit(link, "other", sandbox="T", ctx=100, gpu=100)
    out = link.tool_call_began("S", "pytest", "tc-1", 2.0)
    # agentcg, nothing learned yet (1 s predicted): pin 1 s x 4 + 1 s on the GPU and, the host
    # pool being roomy, write a host copy behind it
    assert out == [Directive("r1", Action.KEEP, ttl_s=5.0), Directive("r1", Action.SWAP_TO_HOST, keep_gpu_copy=True)]
    assert link.requests["r1"].state is State.PAUSED and link.requests["other"].state is State.RUNNING
    link.on_message(KvUsage("r1", 0.0, gpu_tokens=0, host_tokens=600), 2.5)     # the engine dropped the GPU copy
    out = link.tool_call_ended("tc-1", 3.0)
    assert out == [Directive("r1", Action.PREFETCH)]
    r = link.requests["r1"]
    assert (r.state, r.turn, r.tool_call_id) == (State.WAITING, 1, None)
    assert link.counters.events[("paused", "daemon")] == 1 and link.counters.events[("resumed", "daemon")] == 1
    assert link.tool_call_ended("tc-1", 3.1) == []                             # once only


def test_engine_paused_request_is_linked_to_the_running_call_and_resumed_by_the_engine():
    link = _link(calls_of=lambda sandbox: [("tc-9", None)] if sandbox == "S" else [])
    _admit(link)
    link.on_message(RequestEvent("r1", "r1", EventKind.PAUSED, 0.0, 600, sandbox="S", tool="pytest"), 2.0)
    assert link.requests["r1"].tool_call_id == "tc-9"
    link.on_message(KvUsage("r1", 0.0, gpu_tokens=0, host_tokens=600), 2.1)
    assert link.tool_call_ended("tc-9", 2.2) == [Directive("r1", Action.PREFETCH)]
    assert link.requests["r1"].state is State.PAUSED                           # the engine reports RESUMED itself
    link.on_message(RequestEvent("r1", "r1", EventKind.RESUMED, 0.0, 700), 2.3)
    assert link.requests["r1"].state is State.WAITING


def test_vllm_v1_releases_paused_kv_to_the_prefix_cache():
    link = _link("vllm-v1")
    _admit(link)
    assert link.tool_call_began("S", "pytest", "tc-1", 2.0) == [Directive("r1", Action.KEEP, ttl_s=0.0)]


class _Raising:
    name, shares_host_memory = "raising", False

    def decide(self, snap):
        raise RuntimeError("policy bug")

    def observe(self, event):
        raise RuntimeError("policy bug")


def test_a_raising_policy_falls_back_to_vllm_v1_and_is_counted():
    link = _link()
    link.policy, link.policy_label = _Raising(), "custom"
    _admit(link)
    assert link.tool_call_began("S", "pytest", "tc-1", 2.0) == [Directive("r1", Action.KEEP, ttl_s=0.0)]
    assert link.counters.fallbacks == {"custom": 1}
    assert link.counters.policy_failures["custom"] >= 2                       # observe and decide


def test_protocol_rules_on_a_link():
    link = EngineLink(1, 3, "agentcg", EngineCounters(), 1)
    with pytest.raises(ProtocolError, match="first message"):
        link.on_message(KvUsage("r", 0.0, 1), 0.0)
    link.on_message(REG, 0.0)
    link.on_message(REG, 0.0)                                                   # re-register: new bandwidths
    with pytest.raises(ProtocolError, match="its own connection"):
        link.on_message(Register("other", "m", GEOMETRY, REG.tiers, ()), 0.0)
    with pytest.raises(ProtocolError, match="directives go from the daemon"):
        link.on_message(Directive("r", Action.KEEP), 0.0)
    link.on_message(KvUsage("nobody", 0.0, 1), 0.0)
    assert link.counters.unknown_usage == 1
    link.on_message(DirectiveResult("nobody", Action.PREFETCH, False, "unknown request"), 0.0)
    assert link.counters.results == {("prefetch", "refused"): 1} and link.refused == 1
    _admit(link)
    with pytest.raises(ProtocolError, match="max_requests"):
        _admit(link, "r2")


def test_host_pressure_moves_the_coldest_host_copies_to_ssd():
    link = _link()
    _admit(link, "a", gpu=0, ctx=900)
    link.on_message(KvUsage("a", 0.0, 0, host_tokens=900), 1.0)
    link.tool_call_began("S", "pytest", "tc-1", 2.0)
    assert link.host_pressure(3.0, None) == []
    assert link.host_pressure(3.0, 2000 * BPT) == []                            # within its share
    out = link.host_pressure(3.0, 100 * BPT)
    assert out == [Directive("a", Action.DISCARD, tier=Tier.HOST)] or out == [Directive("a", Action.OFFLOAD_TO_SSD)]
    assert link.counters.decisions["host_pressure"] == 1


def test_hub_shares_the_host_budget_with_the_sandboxes():
    hub = EngineHub("agentcg", 4, 16, host_reserve_bytes=100 * BPT)
    link = hub.attach(7)
    link.on_message(REG, 0.0)
    _admit(link, "a", gpu=0, ctx=900)
    link.on_message(KvUsage("a", 0.0, 0, host_tokens=900), 1.0)
    budget = 2000 * BPT
    assert hub.host_shares(None, 0) is None
    assert hub.host_shares(budget, 500 * BPT) == {7: 1400 * BPT}              # budget - reserve - sandboxes
    # the sandboxes may grow into what the pool does not use or can spill (SSD 500 tokens)
    assert hub.sandbox_budget_bytes(budget, 500 * BPT) == budget - 100 * BPT - 400 * BPT
    assert hub.sandbox_budget_bytes(None, 0) is None
    assert hub.detach(7) is link and hub.sandbox_budget_bytes(budget, 0) == budget


def test_records_seed_the_predictor_and_linked_calls_are_not_learned_twice(tmp_path):
    link = _link()
    records = [ToolCallRecord("S", f"tc-{i}", "pytest", "pytest -q", 0.0, 0.0, end_monotonic_s=10.0, exit_code=0)
               for i in range(3)]
    path = tmp_path / "records.jsonl"
    path.write_text("".join(r.to_json() + "\n" for r in records) + "not json\n")
    assert len(read_records_tail(path)) == 3 and read_records_tail(tmp_path / "missing") == []
    assert link.learn_history(read_records_tail(path)) == 3
    prediction = link.policy.state.predictor.predict("S", "pytest")
    assert (prediction.median_s, prediction.source) == (10.0, "sandbox")
    _admit(link)
    link.tool_call_began("S", "pytest", "tc-x", 2.0)
    assert "tc-x" in link.linked_calls
    link.learn(ToolCallRecord("S", "tc-x", "pytest", "pytest -q", 2.0, 0.0, end_monotonic_s=3.0))
    assert "tc-x" not in link.linked_calls and link.policy.state.predictor.predict("S", "pytest").samples == 3


@pytest.mark.parametrize("data, words", [
    ({"kv_policy": "lru"}, "neither"),
    ({"uids": [-1]}, "uids"),
    ({"group": "no-such-group-acg"}, "does not exist"),
    ({"max_links": 0}, "1..64"),
    ({"kv_floor": "lots"}, "kv_floor"),
])
def test_engine_config_errors(data, words):
    with pytest.raises(InvalidInput, match=words):
        parse_config({"engine": data})
    assert parse_config({"engine": {"kv_policy": "pkg.mod:Factory", "uids": [1000]}}).engine.uids == (1000,)
    assert parse_config({}).engine.kv_policy == "agentcg"


def test_a_frozen_call_is_decided_on_again_as_a_long_one():
    hub = EngineHub("agentcg", 4, 16)
    link = hub.attach(5)
    link.on_message(REG, 0.0)
    link.learn_history([{"sandbox": "S", "tool": "pytest", "call_id": f"old{i}", "duration_s": 0.05,
                         "start_monotonic_s": 0.0} for i in range(3)])
    _admit(link)
    # learned: pytest takes 50 ms here, shorter than any copy is worth: keep the KV where it is,
    # pinned 50 ms x 4 + 1 s
    assert hub.tool_call_began("S", "pytest", "pytest -q", "tc-1", 2.0) == [
        (link, [Directive("r1", Action.KEEP, ttl_s=pytest.approx(1.2))])]
    assert hub.tool_signal("tc-1", "thaw", 2.1) == []                          # nothing to decide again
    assert hub.tool_signal("tc-1", "protect", 2.1) == []                       # not a call signal
    # a sandbox policy froze it: it lasts until thawed (pinned until then), so write a host copy now
    assert hub.tool_signal("tc-1", "freeze", 2.2) == [
        (link, [Directive("r1", Action.KEEP), Directive("r1", Action.SWAP_TO_HOST, keep_gpu_copy=True)])]


def test_v2_messages_feed_the_counters_and_the_event_log():
    from agentcg.engine_protocol import EngineStats, KvTransfer, LlmRequest

    appended = []
    link = EngineLink(1, 3, "vllm-v1", EngineCounters(), 16, append=lambda *a: appended.append(a),
                      known_sandbox=lambda name: name == "S")
    link.on_message(REG, 0.0)
    link.on_message(RequestEvent("vllm:a", "a", EventKind.ADMITTED, 1.0, 100, sandbox="S"), 1.0)
    link.on_message(RequestEvent("vllm:b", "b", EventKind.ADMITTED, 1.0, 100, sandbox="ghost"), 1.0)
    link.on_message(RequestEvent("vllm:b", "b", EventKind.PAUSED, 1.0, 100, sandbox="ghost"), 1.0)
    link.on_message(RequestEvent("vllm:a", "a", EventKind.PREEMPTED, 2.0, 100, sandbox="S"), 2.0)
    link.on_message(LlmRequest("cmpl-1", "vllm:a", 3.0, prompt_tokens=100, output_tokens=8, cached_tokens=64,
                               loaded_tokens=32, sandbox="S", arrival_s=2.0, first_token_s=2.5, end_s=3.0), 3.0)
    link.on_message(KvTransfer("vllm:a", "swap_out", Tier.GPU, Tier.HOST, 2, 4096, 0.001), 3.0)
    link.on_message(KvTransfer("vllm:a", "load", Tier.HOST, Tier.GPU, 2, 0, 0.0, ok=False, reason="x"), 3.0)
    link.on_message(DirectiveResult("vllm:a", Action.KEEP, False, "no GPU KV held"), 3.0)
    link.on_message(EngineStats(4.0, kv_usage_frac=0.25, gpu_blocks=64, preemptions_total=1), 4.0)
    c = link.counters
    assert c.preemptions == {"S": 1}
    assert c.unknown_sandbox == 1                       # "ghost", counted once, still tracked by name
    assert link.requests["vllm:b"].sandbox == "ghost"
    assert c.llm_requests == {"S": 1}
    assert c.llm_tokens[("S", "cached")] == 64 and c.llm_tokens[("S", "loaded")] == 32
    assert c.moved_bytes == {("swap_out", "gpu", "host"): 4096}
    assert c.moves[("load", "host", "gpu", "failed")] == 1
    (llm,) = [a for a in appended if a[0] == "llm_request"]
    assert llm[1] == "S" and llm[3]["ttft_s"] == 0.5 and llm[3]["cached_tokens"] == 64
    (kv,) = [a for a in appended if a[0] == "kv_directive"]
    assert kv[3]["action"] == "keep" and kv[3]["ok"] is False
    summary = link.summary()
    assert summary["engine_stats"]["kv_usage_frac"] == 0.25
    assert summary["kv_tokens_by_sandbox"]["S"] == {"gpu": 0, "host": 0, "ssd": 0}


def test_a_failing_event_log_never_breaks_the_link():
    from agentcg.engine_protocol import LlmRequest

    def broken(*a):
        raise RuntimeError("log full")

    link = EngineLink(1, 3, "vllm-v1", EngineCounters(), 16, append=broken)
    link.on_message(REG, 0.0)
    link.on_message(LlmRequest("c", "s", 1.0, prompt_tokens=1, output_tokens=1, cached_tokens=0), 1.0)
    assert link.counters.llm_requests == {"": 1}
