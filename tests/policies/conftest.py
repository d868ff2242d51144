"""Fixtures of the KV policy tests: snapshots built by hand (no engine needed).

`kv` is a namespace with COST, BW, BPT, view(rid, state, **fields) and
snap(trigger, subject, views, **fields)."""
from __future__ import annotations

import types

import pytest

from agentcg.engine_protocol import LLAMA3_8B_BF16, Bandwidth, ComputeCost, Tier
from agentcg.policies.kv.types import KvSnapshot, RequestView, State, Trigger

COST = ComputeCost(step_fixed_s=0.005, token_s=3e-5, prefill_attn_s_per_token_pos=1.3e-9,
                   decode_kv_read_s_per_token=3.4e-8)
BW = (Bandwidth(Tier.GPU, Tier.HOST, 50e9), Bandwidth(Tier.HOST, Tier.GPU, 50e9))
BPT = LLAMA3_8B_BF16.bytes_per_token


def view(rid: str, state: State = State.PAUSED, **kw) -> RequestView:
    kw.setdefault("gpu_tokens", 1000)
    kw.setdefault("context_tokens", kw["gpu_tokens"])
    kw.setdefault("turn", 0)
    return RequestView(request_id=rid, session_id=rid, sandbox=kw.pop("sandbox", rid), state=state, **kw)


def snap(trigger: Trigger, subject: str | None, views: list[RequestView], **kw) -> KvSnapshot:
    defaults = dict(now_s=100.0, bytes_per_token=BPT, gpu_capacity_tokens=100_000, gpu_free_tokens=0,
                    gpu_evictable_tokens=0, host_capacity_bytes=64 << 30, host_used_bytes=0,
                    ssd_capacity_bytes=0, ssd_used_bytes=0, bandwidths=BW, cost=COST,
                    running_batch_tokens=0, running_kv_tokens=0)
    defaults.update(kw)
    return KvSnapshot(trigger=trigger, subject=subject, requests=tuple(views), **defaults)


@pytest.fixture
def kv() -> types.SimpleNamespace:
    return types.SimpleNamespace(COST=COST, BW=BW, BPT=BPT, view=view, snap=snap)
