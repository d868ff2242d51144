"""The one KV decision harness: how every user asks a KV policy and builds what it sees.

Users (the simulator `profiler/kvsim.py`, the reference engine `gpu/engine`, the daemon's
engine link, the vLLM connector) all go through these two pieces, so a policy behaves the
same everywhere:

- `KvDecider(policy, fallback=None)`: `.decide(snapshot) -> Decision` never raises. A policy
  that raises, or answers anything but a `Decision` of `Directive`s, is replaced for that
  decision by the fallback (vllm-v1 unless given), counted in `.errors` (policy failures,
  including failed `observe`/`waiting_key` calls) and `.fallbacks` (decisions the fallback
  made); `.last_error` says which call failed and why. A wake-up time is clamped to at
  least `min_wake_s` after the snapshot's time and dropped when not finite;
  `.wake_at_s` keeps the earliest one pending and `.take_wake(now_s)` consumes it when due.
- `build_snapshot(...)`: the one `KvSnapshot` builder, with the one definition of
  `running_batch_tokens`: the number of RUNNING requests past prefill (decoding one token
  this iteration; InferCept's `running_batch`), and of `running_kv_tokens`: the GPU KV of the
  RUNNING requests. A view says whether it decodes (`RequestView.decoding`); callers derive
  it with `is_decoding(computed_tokens, prompt_tokens)`.

No I/O here: the harness is pure like the policies it wraps.
"""
from __future__ import annotations

import math
from collections.abc import Iterable
from operator import itemgetter

from agentcg.engine_protocol import Bandwidth, ComputeCost, Directive, RequestEvent
from agentcg.policies.kv.types import NO_DECISION, Decision, KvPolicy, KvSnapshot, RequestView, State, Trigger

MIN_WAKE_S = 0.01      # a policy's wake-up is never sooner than this after the snapshot


def is_decoding(computed_tokens: int, prompt_tokens: int) -> bool:
    """A RUNNING request is past prefill once every prompt token has its KV computed (the
    step that computes the last prompt token samples the first output token)."""
    return computed_tokens >= prompt_tokens


def running_batch_tokens(views: Iterable[RequestView]) -> int:
    """Decode tokens of the current iteration: RUNNING requests past prefill."""
    return sum(1 for v in views if v.state is State.RUNNING and v.decoding)


def running_kv_tokens(views: Iterable[RequestView]) -> int:
    """GPU KV of the RUNNING requests (InferCept's RT)."""
    return sum(v.gpu_tokens for v in views if v.state is State.RUNNING)


def build_snapshot(*, now_s: float, trigger: Trigger, subject: str | None, views: Iterable[RequestView],
                   bytes_per_token: int, gpu_capacity_tokens: int, gpu_free_tokens: int,
                   gpu_evictable_tokens: int, host_capacity_bytes: int, host_used_bytes: int,
                   ssd_capacity_bytes: int, ssd_used_bytes: int, bandwidths: Iterable[Bandwidth],
                   cost: ComputeCost, need_tokens: int = 0, need_bytes: int = 0,
                   host_share_bytes: int | None = None) -> KvSnapshot:
    """The snapshot a policy decides on. `views`: one per live request (running, waiting,
    paused), in any order (sorted by request id here, so every user gives the policy the
    same order). `host_share_bytes`: the host pool's share of a host memory budget shared
    with the sandboxes, when smaller than the pool's own capacity."""
    requests = tuple(sorted(views, key=itemgetter(0)))      # RequestView.request_id
    host_capacity = host_capacity_bytes if host_share_bytes is None else min(host_capacity_bytes, host_share_bytes)
    return KvSnapshot(
        now_s=now_s, trigger=trigger, subject=subject, bytes_per_token=bytes_per_token,
        gpu_capacity_tokens=gpu_capacity_tokens, gpu_free_tokens=max(0, gpu_free_tokens),
        gpu_evictable_tokens=max(0, gpu_evictable_tokens),
        host_capacity_bytes=max(0, host_capacity), host_used_bytes=max(0, host_used_bytes),
        ssd_capacity_bytes=max(0, ssd_capacity_bytes), ssd_used_bytes=max(0, ssd_used_bytes),
        bandwidths=tuple(bandwidths), cost=cost,
        running_batch_tokens=running_batch_tokens(requests), running_kv_tokens=running_kv_tokens(requests),
        requests=requests, need_tokens=max(0, need_tokens), need_bytes=max(0, need_bytes))


def clamp_wake(wake_at_s: float | None, now_s: float, min_wake_s: float = MIN_WAKE_S) -> float | None:
    """The wake-up a user schedules: None for none or a non-finite time, else at least
    `min_wake_s` after now (a policy asking for "now" must not spin its user)."""
    if wake_at_s is None or isinstance(wake_at_s, bool) or not isinstance(wake_at_s, (int, float)):
        return None
    if not math.isfinite(wake_at_s):
        return None
    return max(float(wake_at_s), now_s + min_wake_s)


def _valid(decision: object) -> bool:
    return (isinstance(decision, Decision) and isinstance(decision.directives, tuple)
            and all(isinstance(d, Directive) for d in decision.directives))


class KvDecider:
    """A policy behind the harness: decisions never raise, failures are counted."""

    def __init__(self, policy: KvPolicy, fallback: KvPolicy | None = None, min_wake_s: float = MIN_WAKE_S) -> None:
        if fallback is None:
            from agentcg.policies.kv.vllm_v1 import VllmV1Policy
            fallback = VllmV1Policy()
        self.policy, self.fallback, self.min_wake_s = policy, fallback, min_wake_s
        self.errors = 0              # policy calls that raised or answered something invalid
        self.fallbacks = 0           # decisions the fallback made
        self.last_error: str | None = None
        self.wake_at_s: float | None = None

    @property
    def name(self) -> str:
        return str(getattr(self.policy, "name", type(self.policy).__name__))

    @property
    def shares_host_memory(self) -> bool:
        return bool(getattr(self.policy, "shares_host_memory", False))

    @property
    def host_tier(self) -> bool:
        """False for a policy that never uses a host pool (its user reserves none)."""
        return bool(getattr(self.policy, "host_tier", True))

    def _failed(self, call: str, exc: BaseException | str) -> None:
        self.errors += 1
        detail = exc if isinstance(exc, str) else f"{type(exc).__name__}: {exc}"
        self.last_error = f"{self.name}.{call}: {detail}"

    def decide(self, snapshot: KvSnapshot) -> Decision:
        """The policy's decision, or the fallback's when the policy fails; wake-up clamped."""
        try:
            decision = self.policy.decide(snapshot)
            if not _valid(decision):
                self._failed("decide", f"returned {type(decision).__name__}, not a Decision of Directives")
                decision = self.decide_fallback(snapshot)
        except Exception as exc:   # a broken policy must not stop its engine: the fallback decides
            self._failed("decide", exc)
            decision = self.decide_fallback(snapshot)
        wake = clamp_wake(decision.wake_at_s, snapshot.now_s, self.min_wake_s)
        if wake is not None and (self.wake_at_s is None or wake < self.wake_at_s or self.wake_at_s <= snapshot.now_s):
            self.wake_at_s = wake
        if wake != decision.wake_at_s:
            decision = Decision(decision.directives, wake)
        return decision

    def decide_fallback(self, snapshot: KvSnapshot) -> Decision:
        """The fallback's decision (also for users whose own safety net asks it), counted."""
        self.fallbacks += 1
        try:
            decision = self.fallback.decide(snapshot)
            return decision if _valid(decision) else NO_DECISION
        except Exception as exc:
            self.last_error = f"fallback {getattr(self.fallback, 'name', '?')}.decide: {type(exc).__name__}: {exc}"
            return NO_DECISION

    def take_wake(self, now_s: float) -> bool:
        """True once when the pending wake-up is due (the user then asks with a TICK)."""
        if self.wake_at_s is not None and self.wake_at_s <= now_s:
            self.wake_at_s = None
            return True
        return False

    def observe(self, event: RequestEvent) -> None:
        try:
            self.policy.observe(event)
        except Exception as exc:
            self._failed("observe", exc)

    def waiting_key(self, view: RequestView) -> tuple:
        """The policy's waiting-queue order; FCFS by arrival when it fails."""
        try:
            key = self.policy.waiting_key(view)
            if isinstance(key, tuple):
                return (0, key)
            self._failed("waiting_key", f"returned {type(key).__name__}, not a tuple")
        except Exception as exc:
            self._failed("waiting_key", exc)
        return (1, (view.arrival_s,))
