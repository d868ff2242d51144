"""Continuum (arXiv 2511.02230; Hanchenli/vllm-continuum) as a KV policy: pin a finished
call's KV for a time-to-live, so that the agent's next call finds it.

Two TTL rules (docs/kv-policies.md says which the simulator uses):

`released` (vllm/v1/core/estimate_with_func.py `set_up_pin`, FIXED_THRESHOLD 2.0 s): the
tool's mean observed gap (the job's next arrival minus its previous finish) above 2.0 s
gives TTL 0, else 2.0 s; an unseen tool gets 2.0 s; pin only if TTL > 0.01 s.

`paper` (Eq. 1-2, second-hand from the burninglhw reconstruction): tau* = argmax over
{0} U S[f] of U(tau) = P(tau, f)·(T·eta + PrefillReload) - tau, where P is the empirical
CDF of the tool's durations, T the sliding mean wait of evicted requests, eta =
-corr(k, N-k) over finished programs and PrefillReload the prefill time of the context.
Cold start (|S| <= 100 returns in all): exponential prior mu = 1 s, eta = 1, so
tau* = mu·ln(Bn/mu) if Bn = T + PrefillReload > mu, else 0; then the global CDF until the
tool has 100 samples of its own.

Both: the final call of a job gets TTL 0 (ORACLE: `is_last_step`, sent by the client);
the waiting queue serves jobs holding a pin first, then program-level FCFS (the job's
first arrival); the victim is the running request whose job entered running latest,
skipping last-step requests if possible; with at most one running request the pin with
the latest deadline is released instead. An expired pin goes to the prefix cache (LRU).
The tool f is the first word of a Bash command; for the agent's other tools (Read, Edit,
Grep, ...) its name: the released parser would see no ```bash block there and give TTL 0.
"""
from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

from agentcg.engine_protocol import Action, Directive, EventKind, RequestEvent, Tier
from agentcg.policies.bounded import recent
from agentcg.policies.kv.costs import prefill_time_s, transfer_time_s
from agentcg.policies.kv.types import NO_DECISION, Decision, KvSnapshot, RequestView, State, Trigger

FIXED_THRESHOLD_S = 2.0
MIN_TTL_S = 0.01
COLD_START_RETURNS = 100
PRIOR_MEAN_S = 1.0
WAIT_WINDOW = 64          # T's sliding window: unspecified by the paper
SAMPLES_PER_TOOL = 1024
EVICTED_SLACK_TOKENS = 16
RULES = ("released", "paper")


def released_ttl_s(mean_gap_s: float | None, is_last_step: bool) -> float:
    if is_last_step:
        return 0.0
    if mean_gap_s is None:
        return FIXED_THRESHOLD_S
    return 0.0 if mean_gap_s > FIXED_THRESHOLD_S else FIXED_THRESHOLD_S


def paper_ttl_s(durations: list[float], benefit_s: float) -> float:
    """argmax_tau P(tau)·benefit - tau over {0} U durations (ties: the shorter tau)."""
    ordered = sorted(durations)
    n = len(ordered)
    best_tau, best_u = 0.0, 0.0
    for i, tau in enumerate(ordered):
        if i + 1 < n and ordered[i + 1] == tau:
            continue                      # P(tau) counts every sample <= tau
        u = (i + 1) / n * benefit_s - tau
        if u > best_u:
            best_tau, best_u = tau, u
    return best_tau


def cold_start_ttl_s(benefit_s: float, mean_s: float = PRIOR_MEAN_S) -> float:
    """Exponential prior: U(tau) = (1 - e^(-tau/mu))·Bn - tau peaks at mu·ln(Bn/mu)."""
    return mean_s * math.log(benefit_s / mean_s) if benefit_s > mean_s else 0.0


@dataclass
class _Pearson:
    n: int = 0
    sx: float = 0.0
    sy: float = 0.0
    sxx: float = 0.0
    syy: float = 0.0
    sxy: float = 0.0

    def add(self, x: float, y: float) -> None:
        self.n += 1
        self.sx += x
        self.sy += y
        self.sxx += x * x
        self.syy += y * y
        self.sxy += x * y

    def corr(self) -> float | None:
        if self.n < 2:
            return None
        vx = self.n * self.sxx - self.sx ** 2
        vy = self.n * self.syy - self.sy ** 2
        if vx <= 0 or vy <= 0:
            return None
        return (self.n * self.sxy - self.sx * self.sy) / math.sqrt(vx * vy)


@dataclass
class ContinuumState:
    gaps: dict[str, deque] = field(default_factory=dict)         # tool -> observed gaps
    all_gaps: deque = field(default_factory=lambda: deque(maxlen=SAMPLES_PER_TOOL))
    returns: int = 0
    paused: dict[str, tuple[float, str | None, int]] = field(default_factory=dict)  # (at, tool, tokens)
    turns: dict[str, int] = field(default_factory=dict)
    resumed_at: dict[str, tuple[float, int]] = field(default_factory=dict)  # (at, tokens at pause)
    evicted_waits: deque = field(default_factory=lambda: deque(maxlen=WAIT_WINDOW))
    programs: _Pearson = field(default_factory=_Pearson)
    pins: dict[str, float] = field(default_factory=dict)         # request -> deadline


class ContinuumPolicy:
    shares_host_memory = False
    host_tier = False              # alone; policies/kv/offload.py gives it vLLM's host pool

    def __init__(self, rule: str = "released", offload: bool = False) -> None:
        if rule not in RULES:
            raise ValueError(f"continuum rule must be one of {RULES}, got {rule!r}")
        self.rule = rule
        self.offload = offload        # with a host pool: PrefillReload = bytes / host->GPU bandwidth
        self.name = "continuum" if rule == "released" else "continuum-paper"
        self.state = ContinuumState()

    # -- learning -----------------------------------------------------------------
    def observe(self, event: RequestEvent) -> None:
        s = self.state
        rid = event.request_id
        if event.kind is EventKind.PAUSED:
            s.paused[rid] = (event.at_s, event.tool, event.context_tokens)
            s.turns[rid] = s.turns.get(rid, 0) + 1
        elif event.kind is EventKind.RESUMED:
            at, tool, tokens = s.paused.pop(rid, (None, None, 0))
            s.resumed_at[rid] = (event.at_s, tokens)
            if at is not None:
                gap = max(0.0, event.at_s - at)
                recent(s.gaps, tool or "", lambda: deque(maxlen=SAMPLES_PER_TOOL)).append(gap)
                s.all_gaps.append(gap)
                s.returns += 1
        elif event.kind is EventKind.ADMITTED:
            resumed_at, tokens = s.resumed_at.pop(rid, (None, 0))
            # Evicted: the cache lost more than the last partial block of the paused KV.
            if resumed_at is not None and (event.cached_tokens or 0) + EVICTED_SLACK_TOKENS < tokens:
                s.evicted_waits.append(max(0.0, event.at_s - resumed_at))
        elif event.kind is EventKind.FINISHED:
            total = s.turns.pop(rid, 0) + 1
            for k in range(1, total + 1):
                s.programs.add(k, total - k)
            s.paused.pop(rid, None)
            s.pins.pop(rid, None)

    def mean_gap_s(self, tool: str | None) -> float | None:
        gaps = self.state.gaps.get(tool or "")
        return sum(gaps) / len(gaps) if gaps else None

    def eta(self) -> float:
        corr = self.state.programs.corr()
        return 1.0 if corr is None else -corr

    def queue_delay_s(self) -> float:
        waits = self.state.evicted_waits
        return sum(waits) / len(waits) if waits else 0.0

    def ttl_s(self, snap: KvSnapshot, view: RequestView) -> float:
        if self.rule == "released" or view.is_last_step:
            return released_ttl_s(self.mean_gap_s(view.tool), view.is_last_step)
        reload_s = prefill_time_s(snap.cost, view.context_tokens)
        if self.offload and snap.host_capacity_bytes >= view.context_tokens * snap.bytes_per_token:
            # "PrefillReload ... bytes / bandwidth when offloading" (the paper's reload term).
            reload_s = min(reload_s, transfer_time_s(view.context_tokens * snap.bytes_per_token,
                                                     snap.bytes_per_s(Tier.HOST, Tier.GPU)))
        s = self.state
        if s.returns <= COLD_START_RETURNS:
            return cold_start_ttl_s(self.queue_delay_s() + reload_s)
        benefit = self.queue_delay_s() * self.eta() + reload_s
        own = s.gaps.get(view.tool or "")
        samples = own if own is not None and len(own) > COLD_START_RETURNS else s.all_gaps
        return paper_ttl_s(list(samples), benefit)

    # -- decisions ----------------------------------------------------------------
    def decide(self, snap: KvSnapshot) -> Decision:
        if snap.trigger is Trigger.PAUSE and snap.subject is not None:
            view = snap.view(snap.subject)
            if view is None:
                return NO_DECISION
            ttl = self.ttl_s(snap, view)
            if ttl > MIN_TTL_S:
                self.state.pins[view.request_id] = snap.now_s + ttl
                return Decision((Directive(view.request_id, Action.KEEP, ttl_s=ttl),))
            self.state.pins.pop(view.request_id, None)
            return Decision((Directive(view.request_id, Action.KEEP, ttl_s=0.0),))
        if snap.trigger is Trigger.PRESSURE:
            return self._pressure(snap)
        return NO_DECISION

    def _pressure(self, snap: KvSnapshot) -> Decision:
        requester = snap.view(snap.subject)
        if requester is None or requester.state is not State.RUNNING:
            return NO_DECISION
        running = [v for v in snap.requests if v.state is State.RUNNING]
        if len(running) <= 1:
            # Pins of jobs in a tool call or whose next request waits (not yet running).
            pinned = [v for v in snap.requests if v.state is not State.RUNNING and v.pinned and v.gpu_tokens]
            if pinned:
                latest = max(pinned, key=lambda v: self.state.pins.get(v.request_id, 0.0))
                self.state.pins.pop(latest.request_id, None)
                return Decision((Directive(latest.request_id, Action.KEEP, ttl_s=0.0),))
        candidates = [v for v in running if not v.is_last_step] or running
        if not candidates:
            return NO_DECISION
        victim = max(candidates, key=lambda v: v.admitted_s if v.admitted_s is not None else -1.0)
        return Decision((Directive(victim.request_id, Action.PREEMPT, tier=Tier.GPU),))

    def waiting_key(self, view: RequestView) -> tuple:
        pinned = view.pinned and view.gpu_tokens > 0
        if self.rule == "paper":
            return (0 if view.preempted_s is not None else 1 if pinned else 2, view.session_start_s)
        return (0 if pinned else 1, view.session_start_s)
