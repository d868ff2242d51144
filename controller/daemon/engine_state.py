"""What the daemon knows about one engine's requests, and the KvSnapshot built from it.

Pure: no sockets, no clock. `EngineLink` (engine.py) feeds engine-protocol messages and
the daemon's tool-call hooks in here and hands the snapshots to a KV policy.

Times are the daemon's monotonic clock: an event's `at_s` is replaced by the time the
daemon received it, so the policy compares pause times, tool-call records and wake-ups
on one clock whatever the engine's own clock is.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from agentcg.engine_protocol import ComputeCost, EventKind, KvUsage, Register, RequestEvent, Tier
from agentcg.errors import ProtocolError
from agentcg.policies.kv.harness import build_snapshot as harness_snapshot
from agentcg.policies.kv.types import KvSnapshot, RequestView, State, Trigger

# An engine that registers no cost model: the policies then see transfers and recompute
# as free of compute time (they still weigh bandwidths).
DEFAULT_COST = ComputeCost(step_fixed_s=0.0, token_s=0.0, prefill_attn_s_per_token_pos=0.0,
                           decode_kv_read_s_per_token=0.0)


@dataclass
class EngineRequest:
    """One request (an agent session's KV) as the engine and the daemon reported it."""

    request_id: str
    session_id: str
    sandbox: str | None
    state: State
    session_start_s: float
    arrival_s: float
    turn: int = 0
    context_tokens: int = 0
    gpu_tokens: int = 0
    host_tokens: int = 0
    ssd_tokens: int = 0
    pinned: bool = False
    admitted_s: float | None = None
    paused_s: float | None = None
    preempted_s: float | None = None
    tool: str | None = None
    tool_call_id: str | None = None     # the daemon's tool call this request waits for
    paused_by_daemon: bool = False      # the daemon paused it (the engine said nothing): it resumes it too


def check_register(reg: Register) -> None:
    """ProtocolError when a registration cannot describe a KV pool."""
    if reg.geometry.bytes_per_token <= 0:
        raise ProtocolError("register: the KV geometry gives 0 bytes per token; layers, kv_heads, head_dim "
                            "and dtype_bytes must all be positive")
    tiers = [t.tier for t in reg.tiers]
    if len(set(tiers)) != len(tiers):
        raise ProtocolError("register: a tier is listed twice in 'tiers'; give one capacity per tier")
    if Tier.GPU not in tiers:
        raise ProtocolError("register: 'tiers' must give the gpu tier's capacity")
    if Tier.NONE in tiers:
        raise ProtocolError("register: tier 'none' has no capacity; list gpu, host and ssd only")


def capacity_bytes(reg: Register, tier: Tier) -> int:
    return next((t.capacity_bytes for t in reg.tiers if t.tier is tier), 0)


def view_of(r: EngineRequest) -> RequestView:
    return RequestView(
        request_id=r.request_id, session_id=r.session_id, sandbox=r.sandbox or r.session_id, state=r.state,
        turn=r.turn, context_tokens=r.context_tokens, gpu_tokens=r.gpu_tokens, host_tokens=r.host_tokens,
        ssd_tokens=r.ssd_tokens, pinned=r.pinned, arrival_s=r.arrival_s, session_start_s=r.session_start_s,
        admitted_s=r.admitted_s, paused_s=r.paused_s, preempted_s=r.preempted_s,
        tool=r.tool if r.state is State.PAUSED else None,
        # past prefill: the engine reported KV for its whole context since it was admitted
        decoding=r.state is State.RUNNING and r.context_tokens > 0 and r.gpu_tokens >= r.context_tokens)


def gpu_tokens(reg: Register, requests: Iterable[EngineRequest]) -> tuple[int, int, int]:
    """(capacity, free, evictable) GPU tokens: evictable = paused KV nobody pinned (the
    engine's prefix cache gives it up on demand)."""
    capacity = capacity_bytes(reg, Tier.GPU) // reg.geometry.bytes_per_token
    used = evictable = 0
    for r in requests:
        used += r.gpu_tokens
        if r.state is State.PAUSED and not r.pinned:
            evictable += r.gpu_tokens
    return capacity, max(0, capacity - used), evictable


def host_bytes(reg: Register, requests: Iterable[EngineRequest]) -> tuple[int, int]:
    """(used, spillable) bytes of the engine's host KV pool. Spillable: copies whose GPU
    copy is whole (dropped for free) plus what fits on the SSD."""
    bpt = reg.geometry.bytes_per_token
    used = redundant = ssd_used = 0
    for r in requests:
        used += r.host_tokens * bpt
        ssd_used += r.ssd_tokens * bpt
        if r.host_tokens and r.gpu_tokens >= r.host_tokens:
            redundant += r.host_tokens * bpt
    ssd_free = max(0, capacity_bytes(reg, Tier.SSD) - ssd_used)
    return used, min(used, redundant + ssd_free)


def build_snapshot(reg: Register, requests: Iterable[EngineRequest], now_s: float, trigger: Trigger,
                   subject: str | None = None, need_tokens: int = 0, need_bytes: int = 0,
                   host_capacity_bytes: int | None = None) -> KvSnapshot:
    """The KvSnapshot a policy decides on. `host_capacity_bytes`: the host pool's share of
    the host memory budget when that is smaller than what the engine registered."""
    reqs = list(requests)
    capacity, free, evictable = gpu_tokens(reg, reqs)
    host_used, _ = host_bytes(reg, reqs)
    bpt = reg.geometry.bytes_per_token
    return harness_snapshot(
        now_s=now_s, trigger=trigger, subject=subject, views=(view_of(r) for r in reqs), bytes_per_token=bpt,
        gpu_capacity_tokens=capacity, gpu_free_tokens=free, gpu_evictable_tokens=evictable,
        host_capacity_bytes=capacity_bytes(reg, Tier.HOST), host_used_bytes=host_used,
        ssd_capacity_bytes=capacity_bytes(reg, Tier.SSD), ssd_used_bytes=sum(r.ssd_tokens for r in reqs) * bpt,
        bandwidths=reg.bandwidths, cost=reg.cost or DEFAULT_COST, need_tokens=need_tokens, need_bytes=need_bytes,
        host_share_bytes=host_capacity_bytes)


def apply_event(requests: dict[str, EngineRequest], event: RequestEvent, now_s: float) -> EngineRequest | None:
    """Update the table from an engine's RequestEvent; the request, or None once finished.
    A request the daemon has not seen (the engine attached late) is added by any event."""
    r = requests.get(event.request_id)
    if event.kind is EventKind.FINISHED:
        requests.pop(event.request_id, None)
        return None
    if r is None:
        r = EngineRequest(event.request_id, event.session_id, event.sandbox, State.WAITING,
                          session_start_s=now_s, arrival_s=now_s)
        requests[event.request_id] = r
    if event.sandbox is not None:
        r.sandbox = event.sandbox
    r.context_tokens = event.context_tokens
    kind = event.kind
    if kind is EventKind.ADMITTED:
        r.state, r.admitted_s, r.preempted_s = State.RUNNING, now_s, None
        r.paused_s = r.tool = r.tool_call_id = None
        r.paused_by_daemon = False
    elif kind is EventKind.PAUSED:
        if r.state is State.PAUSED and r.paused_by_daemon:
            r.paused_by_daemon = False      # the engine confirms the daemon's pause: it resumes it itself
            r.tool = event.tool or r.tool
        else:
            r.state, r.paused_s, r.admitted_s = State.PAUSED, now_s, None
            r.tool, r.tool_call_id = event.tool, event.tool_call_id
    elif kind is EventKind.RESUMED:
        resume(r, now_s)
    elif kind is EventKind.PREEMPTED:
        r.state, r.preempted_s, r.admitted_s = State.WAITING, now_s, None
    return r


def pause(r: EngineRequest, tool: str, call_id: str, now_s: float) -> None:
    """The daemon saw sandbox r.sandbox begin a tool call: the request waits for it."""
    r.state, r.paused_s, r.admitted_s = State.PAUSED, now_s, None
    r.tool, r.tool_call_id, r.paused_by_daemon = tool, call_id, True


def resume(r: EngineRequest, now_s: float) -> None:
    r.state, r.arrival_s, r.turn = State.WAITING, now_s, r.turn + 1
    r.paused_s = r.tool = r.tool_call_id = None
    r.paused_by_daemon = False


def apply_usage(requests: dict[str, EngineRequest], usage: KvUsage) -> EngineRequest | None:
    r = requests.get(usage.request_id)
    if r is None:
        return None
    r.gpu_tokens, r.host_tokens, r.ssd_tokens = usage.gpu_tokens, usage.host_tokens, usage.ssd_tokens
    r.pinned = usage.pinned
    r.context_tokens = max(r.context_tokens, usage.gpu_tokens, usage.host_tokens, usage.ssd_tokens)
    return r


def shortfall_tokens(reg: Register, requests: Iterable[EngineRequest], r: EngineRequest) -> int:
    """GPU tokens request `r` needs back beyond what is free or evictable (PRESSURE)."""
    missing = max(0, r.context_tokens - r.gpu_tokens)
    _, free, evictable = gpu_tokens(reg, requests)
    return max(0, missing - free - evictable)
