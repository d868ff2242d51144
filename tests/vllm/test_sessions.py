"""The connector's scheduler side without vLLM: sessions, keeps, directives, faults.

vLLM's block pool and Request are stood in for by `Pool` and `request()` below (the same
attributes the connector reads: block ids, hashes and reference counts; request ids, token
ids, computed tokens). That is a mock of vLLM's internals, used so these cases run on a host
without vLLM; test_vllm_live.py runs the same code inside a real vLLM.
"""
from __future__ import annotations

from types import SimpleNamespace

from agentcg.engine_protocol import (
    Action, Directive, DirectiveResult, EventKind, KvTransfer, KvUsage, LlmRequest, RequestEvent, Tier,
)
from agentcg.gpu.vllm.datapath import JobResult
from agentcg.gpu.vllm.sessions import SchedulerSide, session_of

BS = 4


class Pool:
    def __init__(self, n: int) -> None:
        self.blocks = [SimpleNamespace(block_id=i, block_hash=None, ref_cnt=0) for i in range(n)]

    def touch(self, blocks):
        for b in blocks:
            b.ref_cnt += 1

    def free_blocks(self, blocks):
        for b in blocks:
            assert b.ref_cnt > 0, f"block {b.block_id} freed below zero"
            b.ref_cnt -= 1

    def get_usage(self):
        return sum(b.ref_cnt > 0 for b in self.blocks) / len(self.blocks)


def request(rid, prompt, *, session=None, sandbox=None, computed=None, outputs=(), preemptions=0):
    params = {"agentcg_sandbox": sandbox} if sandbox else None
    all_ids = list(prompt) + list(outputs)
    return SimpleNamespace(request_id=rid, session_id=session, kv_transfer_params=params, prompt_token_ids=list(prompt),
                           all_token_ids=all_ids, num_computed_tokens=len(all_ids) - 1 if computed is None else computed,
                           num_output_tokens=len(outputs), num_preemptions=preemptions, arrival_time=0.0,
                           get_finished_reason=lambda: "length")


class Side:
    def __init__(self, up=True, blocks=32, has_host=True):
        self.sent = []
        self.up = up
        self.pool = Pool(blocks)
        self.s = SchedulerSide(BS, self._send, lambda: self.up, hold_s=30.0, has_ssd=False, has_host=has_host)
        self.s.pool = self.pool
        self.queue: list[Directive] = []
        self.s.take = lambda: [self.queue.pop(0) for _ in range(len(self.queue))]

    def _send(self, m):
        self.sent.append(m)
        return self.up

    def of(self, cls):
        return [m for m in self.sent if isinstance(m, cls)]

    def turn(self, rid, prompt, block_ids, *, session="s1", outputs=(1, 2, 3), hashed=True):
        r = request(rid, prompt, session=session, outputs=outputs)
        self.s.new_request(r)
        self.s.matched_tokens(r, 0)
        self.s.after_alloc(r, block_ids, 0)
        for b in block_ids:
            self.pool.blocks[b].ref_cnt += 1      # vLLM's own reference
        full = (len(prompt) + len(outputs) - 1) // BS
        for b in block_ids[:full]:
            if hashed:
                self.pool.blocks[b].block_hash = ("h", b)
        self.s.finished(r, block_ids)
        for b in block_ids:
            self.pool.blocks[b].ref_cnt -= 1      # vLLM frees its reference
        return r


def test_session_and_sandbox_come_from_the_request():
    assert session_of(request("r", [1], session="s")) == ("s", "s")
    assert session_of(request("r", [1], session="s", sandbox="box")) == ("s", "box")
    r = request("r", [1])
    r.kv_transfer_params = {"agentcg_session": "x"}
    assert session_of(r) == ("x", "x")
    assert session_of(request("r", [1])) == (None, None)


def test_a_finished_call_keeps_its_full_blocks_and_reports_its_lifecycle():
    side = Side()
    side.turn("r1", list(range(10)), [5, 6, 7, 8])                # 10 + 3 tokens: 12 computed, 3 full blocks
    assert [b.ref_cnt for b in side.pool.blocks[5:9]] == [1, 1, 1, 0]
    kinds = [e.kind for e in side.of(RequestEvent)]
    assert kinds == [EventKind.ADMITTED, EventKind.PAUSED]
    (call,) = side.of(LlmRequest)
    assert (call.request_id, call.session_id, call.prompt_tokens, call.output_tokens) == ("r1", "s1", 10, 3)
    assert side.of(KvUsage)[-1] == KvUsage("vllm:s1", side.of(KvUsage)[-1].at_s, gpu_tokens=12, pinned=True)
    # the next call of the session is allocated: it holds its own references, ours go
    r2 = request("r2", list(range(20)), session="s1")
    side.s.new_request(r2)
    assert side.of(RequestEvent)[-1].kind is EventKind.RESUMED
    side.s.after_alloc(r2, [5, 6, 7, 9, 10], 0)
    assert [b.ref_cnt for b in side.pool.blocks[5:9]] == [0, 0, 0, 0]


def test_without_the_daemon_nothing_is_kept():
    side = Side(up=False)
    side.turn("r1", list(range(10)), [5, 6, 7, 8])
    assert all(b.ref_cnt == 0 for b in side.pool.blocks)


def test_a_request_without_session_is_reported_and_never_kept():
    side = Side()
    side.turn("r1", list(range(10)), [1, 2, 3, 4], session=None)
    assert all(b.ref_cnt == 0 for b in side.pool.blocks)
    assert [e.kind for e in side.of(RequestEvent)] == [EventKind.ADMITTED, EventKind.FINISHED]
    assert side.of(LlmRequest)[0].session_id == "r1"


def test_keep_ttl_zero_and_discard_give_the_blocks_back():
    side = Side()
    side.turn("r1", list(range(10)), [5, 6, 7, 8])
    side.queue.append(Directive("vllm:s1", Action.KEEP, ttl_s=0.0))
    side.s.build(None)
    assert all(b.ref_cnt == 0 for b in side.pool.blocks)
    assert side.of(DirectiveResult)[-1].ok
    side.queue.append(Directive("vllm:s1", Action.DISCARD))
    side.s.build(None)
    assert side.of(DirectiveResult)[-1].ok


def test_directives_for_unknown_requests_and_freed_blocks_are_refused():
    side = Side()
    side.queue += [Directive("vllm:nobody", Action.KEEP), Directive("vllm:nobody", Action.SWAP_TO_HOST)]
    side.s.build(None)
    results = side.of(DirectiveResult)
    assert [r.ok for r in results] == [False, False] and "unknown request" in results[0].reason
    side.turn("r1", list(range(10)), [5, 6, 7, 8])
    side.queue.append(Directive("vllm:s1", Action.KEEP, ttl_s=0.0))
    side.queue.append(Directive("vllm:s1", Action.SWAP_TO_HOST))       # its blocks went back just before
    side.queue.append(Directive("vllm:s1", Action.OFFLOAD_TO_SSD))     # no SSD tier
    side.queue.append(Directive("vllm:s1", Action.PREFETCH))
    side.queue.append(Directive("vllm:s1", Action.PREEMPT))
    side.s.build(None)
    reasons = [r.reason for r in side.of(DirectiveResult)[2:]]
    assert reasons[0] is None
    assert "freed its blocks already" in reasons[1]
    assert "no SSD tier" in reasons[2]
    assert "only when it is scheduled" in reasons[3] and "preempt" in reasons[4]
    assert all(b.ref_cnt == 0 for b in side.pool.blocks)


def test_swap_to_host_saves_then_releases_and_the_next_call_loads_the_matching_prefix():
    side = Side()
    prompt = list(range(10))
    side.turn("r1", prompt, [5, 6, 7, 8])
    side.queue.append(Directive("vllm:s1", Action.SWAP_TO_HOST))
    saves, _, _ = side.s.build(None)
    assert [(j.key, j.block_ids, j.dst) for j in saves] == [("vllm:s1", (5, 6, 7), "host")]
    assert side.s.has_pending_work()
    side.s.results([JobResult(saves[0].job_id, "vllm:s1", "swap_out", True, 3,
                              legs=[("gpu", "gpu", 300, 0.001), ("device", "host", 300, 0.002)])])
    assert all(b.ref_cnt == 0 for b in side.pool.blocks)
    assert side.of(DirectiveResult)[-1] == DirectiveResult("vllm:s1", Action.SWAP_TO_HOST, True)
    moves = side.of(KvTransfer)
    assert {(m.op, m.src, m.dst) for m in moves} == {("gather", Tier.GPU, Tier.GPU), ("swap_out", Tier.GPU, Tier.HOST)}
    assert side.of(KvUsage)[-1].host_tokens == 12 and side.of(KvUsage)[-1].gpu_tokens == 0
    # next call: same 12-token prefix (10 prompt + outputs 1, 2) and more; vLLM's own hit: 4 tokens
    r2 = request("r2", prompt + [1, 2, 3] + [50, 51, 52, 53, 54], session="s1")
    side.s.new_request(r2)
    assert side.s.matched_tokens(r2, 4) == 8
    side.s.after_alloc(r2, [20, 21, 22, 23, 24], 8)
    _, _, loads = side.s.build(None)
    assert [(j.first, j.block_ids) for j in loads] == [(1, (21, 22))]
    # a call whose prompt differs after 5 tokens matches one block only
    r3 = request("r3", prompt[:5] + [99] * 12, session="s1")
    side.s.new_request(r3)
    assert side.s.matched_tokens(r3, 0) == 0    # the copy is taken by the load in flight


def test_a_failed_load_forgets_the_copy_so_the_next_turn_recomputes():
    side = Side()
    side.turn("r1", list(range(10)), [5, 6, 7, 8])
    side.queue.append(Directive("vllm:s1", Action.SWAP_TO_HOST))
    saves, _, _ = side.s.build(None)
    side.s.results([JobResult(saves[0].job_id, "vllm:s1", "swap_out", True, 3)])
    r2 = request("r2", list(range(10)) + [1, 2, 3, 7, 7, 7, 7, 7], session="s1")
    side.s.new_request(r2)
    n = side.s.matched_tokens(r2, 0)
    side.s.after_alloc(r2, [20, 21, 22, 23, 24], n)
    _, _, loads = side.s.build(None)
    side.s.results([JobResult(loads[0].job_id, "vllm:s1", "load", False, 3, reason="disk gone",
                              failed_block_ids=(21, 22))])
    assert side.of(KvTransfer)[-1].ok is False and side.of(KvTransfer)[-1].reason == "disk gone"
    assert side.s.sessions["vllm:s1"].stored_tier is None


def test_pressure_and_a_lost_link_release_kept_blocks():
    side = Side(has_host=False)
    side.turn("r1", list(range(10)), [5, 6, 7, 8], session="a")
    side.turn("r2", list(range(10)), [9, 10, 11, 12], session="b")
    assert side.s.release_for_pressure()                     # the oldest keep goes first
    assert [b.ref_cnt for b in side.pool.blocks[5:8]] == [0, 0, 0]
    assert [b.ref_cnt for b in side.pool.blocks[9:12]] == [1, 1, 1]
    side.s.build(None)                                       # link up: remembered
    side.up = False
    side.s.build(None)                                       # link down: plain vLLM
    assert all(b.ref_cnt == 0 for b in side.pool.blocks)
    assert not side.s.release_for_pressure()


def test_under_pressure_kept_blocks_are_swapped_to_host_before_they_go():
    side = Side()
    side.turn("r1", list(range(10)), [5, 6, 7, 8], session="a")
    assert side.s.release_for_pressure()                     # vLLM waits a step: a save is queued
    assert side.s.release_for_pressure()                     # and again while it is in flight
    saves, _, _ = side.s.build(None)
    assert [(j.key, j.block_ids) for j in saves] == [("vllm:a", (5, 6, 7))]
    side.s.results([JobResult(saves[0].job_id, "vllm:a", "swap_out", True, 3)])
    assert all(b.ref_cnt == 0 for b in side.pool.blocks)
    assert side.s.sessions["vllm:a"].stored_tier == "host"
    assert not side.s.release_for_pressure()
    side.turn("r2", list(range(10)), [9, 10, 11, 12], session="b")
    assert side.s.release_for_pressure()
    saves, _, _ = side.s.build(None)
    side.s.results([JobResult(saves[0].job_id, "vllm:b", "swap_out", False, 3, reason="host tier full")])
    assert all(b.ref_cnt == 0 for b in side.pool.blocks)    # a failed save frees them all the same


def test_a_waiting_request_that_is_not_admitted_releases_a_keep():
    side = Side(has_host=False)
    side.turn("r1", list(range(10)), [5, 6, 7, 8], session="a")
    big = request("big", list(range(100)))
    side.s.new_request(big)
    side.s.matched_tokens(big, 0)                            # asked, never allocated this step
    side.s.build(None)
    assert all(b.ref_cnt == 0 for b in side.pool.blocks)
    assert side.s.counts["pressure_releases"] == 1


def test_preemptions_are_reported_per_request():
    side = Side()
    r = request("r1", list(range(10)), session="a")
    side.s.new_request(r)
    side.s.matched_tokens(r, 0)
    side.s.after_alloc(r, [1, 2, 3], 0)
    r.num_preemptions = 1
    side.s.build(None)
    assert side.of(RequestEvent)[-1].kind is EventKind.PREEMPTED
    side.s.matched_tokens(r, 0)
    side.s.after_alloc(r, [1, 2, 3], 0)
    assert side.of(RequestEvent)[-1].kind is EventKind.ADMITTED


def test_after_a_reattach_the_kept_sessions_are_reported_again():
    side = Side()
    side.turn("r1", list(range(10)), [5, 6, 7, 8])
    side.sent.clear()
    side.s.resync()
    assert [type(m) for m in side.sent] == [RequestEvent, KvUsage] and side.sent[0].kind is EventKind.PAUSED


def test_a_session_idle_past_session_idle_s_is_finished_and_forgotten():
    now = [100.0]
    side = Side()
    side.s.clock = lambda: now[0]
    side.s.idle_s = 60.0
    side.turn("r1", list(range(10)), [5, 6, 7, 8])
    side.s.build(None)
    assert "vllm:s1" in side.s.sessions
    now[0] += 61.0
    side.s.build(None)
    assert "vllm:s1" not in side.s.sessions and all(b.ref_cnt == 0 for b in side.pool.blocks)
    assert side.of(RequestEvent)[-1].kind is EventKind.FINISHED
