"""The engine protocol: every message type round-trips; malformed input is refused clearly."""
from __future__ import annotations

import json

import pytest

from agentcg.engine_protocol import (
    LLAMA3_8B_BF16, MAX_LINE_BYTES, MESSAGE_TYPES, Action, Bandwidth, ComputeCost, Directive,
    DirectiveResult, EngineStats, EventKind, KvTransfer, KvUsage, LlmRequest, Register, RequestEvent, Tier, TierCapacity, decode, encode,
)
from agentcg.errors import ProtocolError

SAMPLES = [
    Register(
        engine_id="vllm-0", model="llama-3-8b", geometry=LLAMA3_8B_BF16,
        tiers=(TierCapacity(Tier.GPU, 80 << 30), TierCapacity(Tier.HOST, 256 << 30)),
        bandwidths=(Bandwidth(Tier.GPU, Tier.HOST, 50e9), Bandwidth(Tier.HOST, Tier.GPU, 50e9)),
        cost=ComputeCost(0.005, 3e-5, 1.3e-9, 3.4e-8),
    ),
    Register(engine_id="e", model="m", geometry=LLAMA3_8B_BF16, tiers=(), bandwidths=()),
    RequestEvent("r1", "s1", EventKind.PAUSED, 12.5, 40_000, sandbox="sb1", tool="Bash:pytest", tool_call_id="c7"),
    RequestEvent("r1", "s1", EventKind.RESUMED, 20.0, 40_100),
    KvUsage("r1", 3.0, gpu_tokens=1000, host_tokens=24, ssd_tokens=0, pinned=True),
    Directive("r1", Action.KEEP, ttl_s=2.0),
    Directive("r1", Action.SWAP_TO_HOST, tokens=480, keep_gpu_copy=True),
    Directive("r1", Action.PREEMPT, tier=Tier.NONE),
    DirectiveResult("r9", Action.DISCARD, ok=False, reason="unknown request r9"),
    LlmRequest("cmpl-1", "s1", 30.0, prompt_tokens=900, output_tokens=32, cached_tokens=640, loaded_tokens=256,
               sandbox="sb1", arrival_s=29.0, first_token_s=29.5, end_s=30.0, finish_reason="length"),
    KvTransfer("s1", "swap_out", Tier.GPU, Tier.HOST, blocks=4, bytes=1 << 20, seconds=0.002),
    EngineStats(31.0, kv_usage_frac=0.5, gpu_blocks=512, preemptions_total=3, source="http://127.0.0.1:8000/metrics"),
]


def test_a_v1_line_of_a_v1_type_is_still_read():
    line = encode(Directive("r1", Action.KEEP)).replace(b'"v":2', b'"v":1')
    assert decode(line) == Directive("r1", Action.KEEP)


def test_every_message_type_is_sampled():
    assert {type(m) for m in SAMPLES} == set(MESSAGE_TYPES.values())


@pytest.mark.parametrize("message", SAMPLES, ids=lambda m: type(m).__name__)
def test_round_trip(message):
    line = encode(message)
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert decode(line) == message
    assert decode(line.decode()) == message


def test_geometry_of_llama3_8b_is_128_kib_per_token():
    assert LLAMA3_8B_BF16.bytes_per_token == 128 * 1024


def _line(**body):
    return json.dumps(body).encode()


@pytest.mark.parametrize("raw, words", [
    (b"not json", "not valid JSON"),
    (b"[1, 2]", "JSON object"),
    (_line(type="directive", request_id="r", action="keep"), "version"),
    (_line(v=3, type="directive", request_id="r", action="keep"), "version 3"),
    (_line(v=True, type="directive", request_id="r", action="keep"), "version True"),
    (_line(v=1, type="kv_transfer", request_id="r", op="load", src="host", dst="gpu", blocks=1, bytes=1,
           seconds=0.1), "needs engine protocol v2"),
    (_line(v=2, type="llm_request", request_id="r", session_id="s", at_s=1, prompt_tokens=-1, output_tokens=0,
           cached_tokens=0), "non-negative"),
    (_line(v=1, type="teleport"), "unknown message type"),
    (_line(v=1, type="directive", action="keep"), "missing field 'request_id'"),
    (_line(v=1, type="directive", request_id="r", action="melt"), "not one of"),
    (_line(v=1, type="directive", request_id="r", action="keep", ttl_s=-1), "non-negative"),
    (_line(v=1, type="directive", request_id="r", action="keep", ttl_s="2s"), "number"),
    (_line(v=1, type="directive", request_id="r", action="keep", colour="red"), "unknown field"),
    (_line(v=1, type="kv_usage", request_id="r", at_s=1, gpu_tokens=True), "integer"),
    (_line(v=1, type="kv_usage", request_id="", at_s=1, gpu_tokens=1), "string"),
    (_line(v=1, type="register", engine_id="e", model="m", geometry=[], tiers=[], bandwidths=[]),
     "geometry: expected an object"),
    (_line(v=1, type="request_event", request_id="r", session_id="s", kind="paused", at_s=1,
           context_tokens=None), "must not be null"),
])
def test_malformed_input_is_refused_with_a_reason(raw, words):
    with pytest.raises(ProtocolError, match=words):
        decode(raw)


def test_oversized_lines_are_refused_both_ways():
    with pytest.raises(ProtocolError, match="line limit"):
        decode(b"{" + b" " * MAX_LINE_BYTES + b"}")
    with pytest.raises(ProtocolError, match="line limit"):
        encode(DirectiveResult("r", Action.KEEP, ok=False, reason="x" * MAX_LINE_BYTES))


def test_encoding_a_foreign_object_is_refused():
    with pytest.raises(ProtocolError, match="not an engine protocol message"):
        encode({"type": "directive"})  # type: ignore[arg-type]
