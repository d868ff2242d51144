"""The engine protocol, version 2: messages between an inference engine and agentcg.

The engine registers its KV geometry, tier capacities, transfer bandwidths and compute
costs (`Register`), reports request events (`RequestEvent`: admitted, paused for a tool
call with its session and sandbox, resumed, preempted, finished) and KV usage per request
and tier (`KvUsage`); agentcg answers with per-request `Directive`s (keep with an optional
time-to-live, swap to host, offload to SSD, discard, prefetch back, preempt), and the
engine acknowledges each one (`DirectiveResult`), refusing for example a directive for a
request it does not know.

Version 2 adds what a real engine (vLLM, through agentcg.gpu.vllm) reports besides:
`LlmRequest` (one LLM call of a session, when it finished: tokens, cache hits, times),
`KvTransfer` (one measured move of a session's KV between tiers) and `EngineStats`
(engine-wide counters scraped from the engine, e.g. vLLM's /metrics). A version-1 line is
still accepted (its messages are unchanged); the version-2 types need `"v": 2`.

Wire format: JSON lines, one object per line, at most `MAX_LINE_BYTES`, each carrying
`"v": 1` or `2` and `"type"`; the other keys are the dataclass fields. `decode` refuses
anything else with `ProtocolError`. The socket side belongs to the daemon; this module only defines
the messages and their codec (docs/kv-policies.md, "Engine protocol").
"""
from __future__ import annotations

import dataclasses
import enum
import json
import math
import types
import typing
from dataclasses import dataclass
from typing import Any, Union

from agentcg.errors import ProtocolError

PROTOCOL_VERSION = 2
SUPPORTED_VERSIONS = (1, 2)
MAX_LINE_BYTES = 64 * 1024
MAX_STRING_CHARS = 1024


class Tier(str, enum.Enum):
    """Where a request's KV lives. `none` means nowhere (it must be recomputed)."""

    GPU = "gpu"
    HOST = "host"
    SSD = "ssd"
    NONE = "none"


class Action(str, enum.Enum):
    KEEP = "keep"                    # pin on the GPU; ttl_s=None: until resumed; then evictable
    SWAP_TO_HOST = "swap_to_host"    # copy (the tail `tokens` of) the GPU KV to host memory
    OFFLOAD_TO_SSD = "offload_to_ssd"  # move the KV (from host, else GPU) to SSD
    DISCARD = "discard"              # drop the copy in `tier` (None: every copy)
    PREFETCH = "prefetch"            # bring host/SSD KV back to the GPU before the request resumes
    PREEMPT = "preempt"              # stop a running request; its KV goes to `tier`


class EventKind(str, enum.Enum):
    ADMITTED = "admitted"
    PAUSED = "paused"          # the request stopped for a tool call (session, sandbox, tool)
    RESUMED = "resumed"        # the tool call returned; the request wants to run again
    PREEMPTED = "preempted"
    FINISHED = "finished"      # the session's last request finished


@dataclass(frozen=True)
class KvGeometry:
    layers: int
    kv_heads: int
    head_dim: int
    dtype_bytes: int
    block_tokens: int = 16

    @property
    def bytes_per_token(self) -> int:
        # K and V, every layer.
        return 2 * self.layers * self.kv_heads * self.head_dim * self.dtype_bytes


LLAMA3_8B_BF16 = KvGeometry(layers=32, kv_heads=8, head_dim=128, dtype_bytes=2)  # 128 KiB/token


@dataclass(frozen=True)
class TierCapacity:
    tier: Tier
    capacity_bytes: int


@dataclass(frozen=True)
class Bandwidth:
    src: Tier
    dst: Tier
    bytes_per_s: float


@dataclass(frozen=True)
class ComputeCost:
    """A linear step-time model of the engine (docs/kv-policies.md, "Cost model")."""

    step_fixed_s: float                 # per iteration: weights read, launch, scheduling
    token_s: float                      # per scheduled token (GEMMs)
    prefill_attn_s_per_token_pos: float  # attention: per prefill token per context position
    decode_kv_read_s_per_token: float   # per decoding sequence, per context token read
    max_batched_tokens: int = 8192
    max_running: int = 256


@dataclass(frozen=True)
class Register:
    engine_id: str
    model: str
    geometry: KvGeometry
    tiers: tuple[TierCapacity, ...]
    bandwidths: tuple[Bandwidth, ...]
    cost: ComputeCost | None = None


@dataclass(frozen=True)
class RequestEvent:
    request_id: str
    session_id: str
    kind: EventKind
    at_s: float
    context_tokens: int
    sandbox: str | None = None
    tool: str | None = None
    tool_call_id: str | None = None
    cached_tokens: int | None = None   # ADMITTED: the prefix found in the KV cache


@dataclass(frozen=True)
class KvUsage:
    request_id: str
    at_s: float
    gpu_tokens: int
    host_tokens: int = 0
    ssd_tokens: int = 0
    pinned: bool = False


@dataclass(frozen=True)
class Directive:
    request_id: str
    action: Action
    ttl_s: float | None = None     # KEEP only
    tokens: int | None = None      # SWAP_TO_HOST: the tail to move; None: all
    tier: Tier | None = None       # DISCARD: which copy; PREEMPT: where the KV goes
    keep_gpu_copy: bool = False    # SWAP_TO_HOST: write a host copy, leave the GPU copy


@dataclass(frozen=True)
class DirectiveResult:
    request_id: str
    action: Action
    ok: bool
    reason: str | None = None


@dataclass(frozen=True)
class LlmRequest:
    """v2: one LLM call (one engine request) of session `session_id`, sent when it ended.
    Times are seconds of the engine's monotonic clock; None: not measured."""

    request_id: str                  # the engine's id of this call
    session_id: str                  # the protocol request (the session's KV) it extends
    at_s: float
    prompt_tokens: int
    output_tokens: int
    cached_tokens: int               # prompt tokens found in the engine's own prefix cache
    loaded_tokens: int = 0           # prompt tokens agentcg loaded back from host or SSD
    preemptions: int = 0
    sandbox: str | None = None
    arrival_s: float | None = None
    first_token_s: float | None = None
    end_s: float | None = None
    finish_reason: str | None = None


@dataclass(frozen=True)
class KvTransfer:
    """v2: one measured move of session `request_id`'s KV (done or failed)."""

    request_id: str
    op: str                          # swap_out, offload, load, save, ...
    src: Tier
    dst: Tier
    blocks: int
    bytes: int
    seconds: float
    ok: bool = True
    reason: str | None = None


@dataclass(frozen=True)
class EngineStats:
    """v2: engine-wide figures (vLLM: its /metrics); None: the engine does not give it."""

    at_s: float
    kv_usage_frac: float | None = None       # GPU KV blocks in use / all of them
    gpu_blocks: int | None = None
    held_blocks: int | None = None           # blocks agentcg keeps for paused sessions
    running: int | None = None
    waiting: int | None = None
    preemptions_total: int | None = None
    prefix_cache_queries: int | None = None  # tokens
    prefix_cache_hits: int | None = None     # tokens
    source: str | None = None                # where the figures came from (a URL)


Message = Union[Register, RequestEvent, KvUsage, Directive, DirectiveResult, LlmRequest, KvTransfer, EngineStats]

MESSAGE_TYPES: dict[str, type] = {
    "register": Register,
    "request_event": RequestEvent,
    "kv_usage": KvUsage,
    "directive": Directive,
    "directive_result": DirectiveResult,
    "llm_request": LlmRequest,
    "kv_transfer": KvTransfer,
    "engine_stats": EngineStats,
}
V2_TYPES = frozenset({"llm_request", "kv_transfer", "engine_stats"})
_TYPE_NAMES = {cls: name for name, cls in MESSAGE_TYPES.items()}


def encode(message: Message) -> bytes:
    """One message -> one JSON line (bytes, newline-terminated)."""
    name = _TYPE_NAMES.get(type(message))
    if name is None:
        raise ProtocolError(f"cannot encode {type(message).__name__}: not an engine protocol message")
    body = {"v": PROTOCOL_VERSION, "type": name, **_to_json(message)}
    line = json.dumps(body, separators=(",", ":"), allow_nan=False).encode() + b"\n"
    if len(line) > MAX_LINE_BYTES:
        raise ProtocolError(f"{name} message is {len(line)} bytes, over the {MAX_LINE_BYTES}-byte line limit")
    return line


def decode(line: bytes | str) -> Message:
    """One JSON line -> its message; ProtocolError says what was wrong."""
    raw = line.encode() if isinstance(line, str) else bytes(line)
    if len(raw) > MAX_LINE_BYTES:
        raise ProtocolError(f"message is {len(raw)} bytes, over the {MAX_LINE_BYTES}-byte line limit")
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ProtocolError(f"message is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ProtocolError(f"message must be a JSON object, got {type(data).__name__}")
    version = data.pop("v", None)
    if isinstance(version, bool) or version not in SUPPORTED_VERSIONS:
        raise ProtocolError(f"engine protocol version {version!r} is not supported; this agentcg speaks "
                            f"v{PROTOCOL_VERSION} (and reads v1)")
    name = data.pop("type", None)
    cls = MESSAGE_TYPES.get(name) if isinstance(name, str) else None
    if cls is None:
        raise ProtocolError(f"unknown message type {name!r}; expected one of {', '.join(MESSAGE_TYPES)}")
    if version < 2 and name in V2_TYPES:
        raise ProtocolError(f"message type {name!r} needs engine protocol v2; this line says v{version}")
    return _from_json(cls, data, name)


def _to_json(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return {f.name: _to_json(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, tuple):
        return [_to_json(v) for v in value]
    return value


def _from_json(cls: type, data: Any, where: str) -> Any:
    if not isinstance(data, dict):
        raise ProtocolError(f"{where}: expected an object, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ProtocolError(f"{where}: unknown field(s) {', '.join(unknown)}")
    kwargs = {}
    for name, f in fields.items():
        if name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ProtocolError(f"{where}: missing field {name!r}")
            continue
        kwargs[name] = _value(hints[name], data[name], f"{where}.{name}")
    return cls(**kwargs)


def _value(hint: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None:
            if type(None) in options:
                return None
            raise ProtocolError(f"{where}: must not be null")
        (inner,) = [o for o in options if o is not type(None)]
        return _value(inner, value, where)
    if value is None:
        raise ProtocolError(f"{where}: must not be null")
    if origin is tuple:
        if not isinstance(value, list):
            raise ProtocolError(f"{where}: expected a list, got {type(value).__name__}")
        if len(value) > 64:
            raise ProtocolError(f"{where}: at most 64 entries, got {len(value)}")
        (inner, _) = typing.get_args(hint)
        return tuple(_value(inner, v, f"{where}[{i}]") for i, v in enumerate(value))
    if dataclasses.is_dataclass(hint):
        return _from_json(hint, value, where)
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        try:
            return hint(value)
        except ValueError:
            allowed = ", ".join(m.value for m in hint)
            raise ProtocolError(f"{where}: {value!r} is not one of {allowed}") from None
    if hint is bool:
        if not isinstance(value, bool):
            raise ProtocolError(f"{where}: expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ProtocolError(f"{where}: expected a non-negative integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise ProtocolError(f"{where}: expected a finite non-negative number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str) or not value or len(value) > MAX_STRING_CHARS:
            raise ProtocolError(f"{where}: expected a string of 1 to {MAX_STRING_CHARS} characters, got {value!r:.80}")
        return value
    raise AssertionError(f"unsupported field type {hint!r}")
