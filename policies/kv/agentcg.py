"""agentcg's KV policy: decide from what the agent's tool call and its sandbox are doing.

Inputs only agentcg has (no oracle): the tool call in progress (its tool, from the gap's
first call, and live signals: throttled, frozen, exited), durations learned causally from
finished calls (per sandbox and tool, `ToolDurationPredictor`), and the sandboxes' memory
(the host KV pool follows it).

- On a pause, predict the call's remaining time. The KV is kept pinned for that time x
  `PIN_SLACK` (+ 1 s), then goes to the prefix cache (evictable, LRU), so a call that
  overruns its prediction stops holding GPU memory others need. A call predicted longer
  than `MIN_COPY_S` and a KV round trip also writes a host copy in the background (only
  the tokens the copy lacks), room made only from redundant copies.
- Under GPU pressure, first free what loses no work: GPU copies backed by a host/SSD copy
  whose call lasts longer than the copy takes to come back. A waiting request takes no
  kept KV (as in vLLM); a running one, when it is alone, releases the kept KV of the
  longest calls, else preempts the latest admitted request (to host when there is room).
  (`swap_under_pressure` also swaps unbacked paused KV out: off by default, the stall
  until the copy lands cost more than it saved in the simulator.)
- Prefetch a dropped KV back a transfer time before the call is predicted to end, or at
  once when the controller says the call exited, if the GPU has room: the load is off the
  request's critical path (vLLM's offloading loads only when the request is scheduled).
- Host memory: one budget with the sandboxes (`HostMemoryBudget`); when sandboxes need
  RAM (HOST_PRESSURE) the pool shrinks: redundant copies first, then the coldest go to SSD
  (or are dropped); room for a new copy never drops another's only copy.
- Waiting queue (as Continuum): preempted first, then requests with KV kept on the GPU,
  then program FCFS (older sessions first).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from agentcg.engine_protocol import Action, Directive, EventKind, RequestEvent, Tier
from agentcg.policies.kv.costs import transfer_time_s
from agentcg.policies.kv.predictor import ToolDurationPredictor, ToolSignal, remaining_s
from agentcg.policies.kv.types import NO_DECISION, Decision, KvSnapshot, RequestView, State, Trigger

MIN_COPY_S = 5.0            # calls predicted shorter than this never get a host copy (the copy
                            # competes for the link and the host pool with longer calls' copies)
MIN_ROOMY_COPY_S = 0.2      # ... unless the host has room to spare (ROOMY_FRACTION of its pool free)
ROOMY_FRACTION = 0.25
PREFETCH_MARGIN_S = 0.05
PREFETCH_HEADROOM = 0.02    # of GPU capacity left free after a prefetch
PREFETCH_RETRY_S = 0.25
PIN_SLACK = 4.0             # a pin lasts the call's predicted remaining time x this, plus
PIN_MARGIN_S = 1.0


@dataclass(frozen=True)
class HostMemoryBudget:
    """One host memory budget for the sandboxes and the host KV pool."""

    total_bytes: int
    reserve_bytes: int = 0        # OS, engine process, page cache floor
    kv_floor_bytes: int = 0       # the KV pool never shrinks below this

    def kv_capacity_bytes(self, sandbox_bytes: int) -> int:
        return max(self.kv_floor_bytes, self.total_bytes - self.reserve_bytes - sandbox_bytes)

    def sandbox_headroom_bytes(self, sandbox_bytes: int, kv_used_bytes: int, kv_spillable_bytes: int) -> int:
        """How much more the sandboxes may take before they must be throttled: the KV
        pool gives back what it does not use and what it can spill to SSD, not more."""
        kv_needed = max(self.kv_floor_bytes, kv_used_bytes - kv_spillable_bytes)
        return max(0, self.total_bytes - self.reserve_bytes - sandbox_bytes - kv_needed)


@dataclass
class AgentcgState:
    predictor: ToolDurationPredictor = field(default_factory=ToolDurationPredictor)
    paused: dict[str, tuple[float, str, str]] = field(default_factory=dict)  # request -> (at, sandbox, tool)
    signals: dict[str, ToolSignal] = field(default_factory=dict)
    exited: set[str] = field(default_factory=set)


class AgentcgPolicy:
    name = "agentcg"
    shares_host_memory = True

    def __init__(self, min_copy_s: float = MIN_COPY_S, swap_under_pressure: bool = False,
                 queue: str = "pinned", pin_slack: float | None = PIN_SLACK,
                 roomy_fraction: float = ROOMY_FRACTION) -> None:
        if queue not in ("pinned", "resident"):
            raise ValueError(f"agentcg queue must be 'pinned' or 'resident', got {queue!r}")
        self.min_copy_s = min_copy_s
        self.pin_slack = pin_slack
        self.roomy_fraction = roomy_fraction
        self.queue = queue
        self.swap_under_pressure = swap_under_pressure
        self.state = AgentcgState()
        self._ranked: tuple[KvSnapshot, list] | None = None

    # -- learning -----------------------------------------------------------------
    def observe(self, event: RequestEvent) -> None:
        s = self.state
        if event.kind is EventKind.PAUSED:
            s.paused[event.request_id] = (event.at_s, event.sandbox or event.session_id, event.tool or "unknown")
            s.signals.pop(event.request_id, None)
        elif event.kind is EventKind.RESUMED:
            paused = s.paused.pop(event.request_id, None)
            s.signals.pop(event.request_id, None)
            if paused is not None:
                at, sandbox, tool = paused
                s.predictor.record(sandbox, tool, event.at_s - at)
        elif event.kind is EventKind.FINISHED:
            s.paused.pop(event.request_id, None)
            s.signals.pop(event.request_id, None)

    def signal(self, request_id: str, signal: ToolSignal) -> None:
        """A live tool-call signal from the controller (throttled, frozen, exited...)."""
        if request_id in self.state.paused:
            self.state.signals[request_id] = signal

    def remaining_s(self, view: RequestView, now_s: float) -> float:
        paused = self.state.paused.get(view.request_id)
        sandbox, tool = (paused[1], paused[2]) if paused else (view.sandbox, view.tool or "unknown")
        prediction = self.state.predictor.predict(sandbox, tool)
        elapsed = now_s - view.paused_s if view.paused_s is not None else 0.0
        return remaining_s(prediction, elapsed, self.state.signals.get(view.request_id))

    # -- decisions ----------------------------------------------------------------
    def decide(self, snap: KvSnapshot) -> Decision:
        if snap.trigger is Trigger.PAUSE:
            return self._pause(snap)
        if snap.trigger is Trigger.PRESSURE:
            return self._pressure(snap)
        if snap.trigger is Trigger.HOST_PRESSURE:
            return Decision(tuple(self._free_host(snap, snap.need_bytes, exclude=set(), must=True)[0]))
        if snap.trigger is Trigger.TICK:
            return self._prefetch(snap)
        return NO_DECISION

    def _pause(self, snap: KvSnapshot) -> Decision:
        """Keep the KV pinned through the call; a call predicted longer than a round trip
        also writes a host copy (what the copy lacks), so that under pressure the GPU
        copy can go at once and be prefetched before the call should end."""
        view = snap.view(snap.subject)
        if view is None:
            return NO_DECISION
        rid = view.request_id
        left = self.remaining_s(view, snap.now_s)
        ttl = None if self.pin_slack is None or not math.isfinite(left) else left * self.pin_slack + PIN_MARGIN_S
        keep = Directive(rid, Action.KEEP, ttl_s=ttl)
        missing = max(0, view.gpu_tokens - view.host_tokens) * snap.bytes_per_token
        # A copy costs link time and host memory other calls' copies could use: any call
        # longer than a round trip gets one while the host has room to spare, only calls
        # longer than `min_copy_s` when it is short.
        roomy = snap.host_free_bytes - missing >= self.roomy_fraction * snap.host_capacity_bytes
        threshold = MIN_ROOMY_COPY_S if roomy else self.min_copy_s
        if left < max(threshold, self._round_trip_s(snap, view)) or missing == 0:
            return Decision((keep,), wake_at_s=self._next_wake(snap))
        room, freed, _ = self._free_host(snap, missing - snap.host_free_bytes, exclude={rid})
        if freed < missing - snap.host_free_bytes:
            return Decision((keep,), wake_at_s=self._next_wake(snap))
        return Decision(tuple(room) + (keep, Directive(rid, Action.SWAP_TO_HOST, keep_gpu_copy=True)),
                        wake_at_s=self._next_wake(snap))

    @staticmethod
    def _round_trip_s(snap: KvSnapshot, view: RequestView) -> float:
        nbytes = view.gpu_tokens * snap.bytes_per_token
        return (transfer_time_s(nbytes, snap.bytes_per_s(Tier.GPU, Tier.HOST))
                + transfer_time_s(nbytes, snap.bytes_per_s(Tier.HOST, Tier.GPU)))

    def _paused_by_remaining(self, snap: KvSnapshot) -> list[tuple[float, RequestView]]:
        paused = [(self.remaining_s(v, snap.now_s), v) for v in snap.requests
                  if v.state is State.PAUSED and v.gpu_tokens > 0]
        paused.sort(key=lambda item: -item[0])
        return paused

    def _pressure(self, snap: KvSnapshot) -> Decision:
        """Free GPU memory without losing work first, then only from younger programs.

        1. GPU copies of paused KV backed by a host/SSD copy, whose call lasts longer than
           the copy takes to come back (prefetched before the predicted end): free at once.
        2. Paused KV whose call lasts longer than a round trip: swapped out into free host
           memory (room made only from redundant copies, never by dropping a sole one).
        3. Programs younger than the requester (program FCFS, as the queue): their paused
           or waiting KV goes to the prefix cache, their running requests are preempted
           (to host when it has room), youngest first.
        4. A running requester that is itself the youngest is preempted (vLLM does the same
           when the victim is the requester); a waiting one waits.
        """
        requester = snap.view(snap.subject)
        if requester is None:
            return NO_DECISION
        need = snap.need_tokens
        bpt = snap.bytes_per_token
        out: list[Directive] = []
        done: set[str] = set()
        host_free = snap.host_free_bytes
        paused = self._paused_by_remaining(snap)
        h2d = snap.bytes_per_s(Tier.HOST, Tier.GPU)
        for left, v in paused:
            if need <= 0:
                break
            backed = v.host_tokens + v.ssd_tokens >= v.gpu_tokens or v.copy_to_host_pending
            if backed and left > transfer_time_s(v.gpu_tokens * bpt, h2d):
                out.append(Directive(v.request_id, Action.DISCARD, tier=Tier.GPU))
                done.add(v.request_id)
                need -= v.gpu_tokens
        for left, v in paused:
            if need <= 0 or not self.swap_under_pressure:
                break
            nbytes = v.gpu_tokens * bpt
            if v.request_id in done or left <= max(self.min_copy_s, self._round_trip_s(snap, v)):
                continue
            if nbytes > host_free:
                room, freed, chosen = self._free_host(snap, nbytes - host_free, exclude=done | {v.request_id})
                if freed < nbytes - host_free:
                    continue
                out += room
                done |= chosen
                host_free += freed
            out.append(Directive(v.request_id, Action.SWAP_TO_HOST))
            done.add(v.request_id)
            host_free -= nbytes
            need -= v.gpu_tokens
        running = [v for v in snap.requests if v.state is State.RUNNING]
        if need <= 0 or (requester.state is not State.RUNNING and running):
            return Decision(tuple(out))        # a waiting request evicts no kept KV while others run (as vLLM)
        if len(running) <= 1:
            # Nothing else runs: release the kept KV of the calls that will last longest.
            for left, v in paused:
                if need <= 0:
                    break
                if v.request_id not in done and v.pinned:
                    out.append(Directive(v.request_id, Action.KEEP, ttl_s=0.0))
                    need -= v.gpu_tokens
            if need <= 0 or not running:
                return Decision(tuple(out))
        victim = max(running, key=lambda v: (v.admitted_s if v.admitted_s is not None else -1.0, v.request_id))
        tier, host_free = self._preempt_tier(snap, victim, host_free)
        out.append(Directive(victim.request_id, Action.PREEMPT, tier=tier))
        return Decision(tuple(out))

    @staticmethod
    def _preempt_tier(snap: KvSnapshot, v: RequestView, host_free: int) -> tuple[Tier, int]:
        nbytes = v.gpu_tokens * snap.bytes_per_token
        if v.host_tokens == 0 and nbytes <= host_free:
            return Tier.HOST, host_free - nbytes
        return Tier.GPU, host_free

    def _host_ranked(self, snap: KvSnapshot) -> list[tuple[int, RequestView]]:
        """Host copies, cheapest to lose first: stale copies of requests not paused whose
        GPU copy is whole; redundant copies of paused calls (longest first); sole copies of
        paused calls (longest first); copies of requests about to come back. Computed
        once per snapshot."""
        if self._ranked is not None and self._ranked[0] is snap:
            return self._ranked[1]

        def rank(v: RequestView) -> tuple:
            if v.gpu_tokens >= v.host_tokens:          # the GPU holds it all: a redundant copy
                return (0, 0.0) if v.state is not State.PAUSED else (1, -self.remaining_s(v, snap.now_s))
            if v.state is not State.PAUSED:            # about to come back: keep it to the last
                return (3, v.session_start_s)
            return (2, -self.remaining_s(v, snap.now_s))

        keyed = sorted(((rank(v), v.request_id, v) for v in snap.requests if v.host_tokens > 0),
                       key=lambda item: (item[0], item[1]))
        ranked = [(r[0], v) for r, _, v in keyed]
        self._ranked = (snap, ranked)
        return ranked

    def _free_host(self, snap: KvSnapshot, need_bytes: int, exclude: set[str],
                   must: bool = False) -> tuple[list[Directive], int, set[str]]:
        """Free `need_bytes` of the host pool: stale copies of running requests, copies
        whose GPU copy is whole, then the coldest copies go to SSD. Only when the memory
        `must` be given back (the sandboxes need it) is a sole copy dropped without an SSD
        to take it: to make room for another copy that would only trade one recompute
        for another. Requests in `exclude` are not touched; returns the directives, the
        bytes they free and the requests they name."""
        if need_bytes <= 0:
            return [], 0, set()
        out: list[Directive] = []
        freed = 0
        ssd_free = snap.ssd_capacity_bytes - snap.ssd_used_bytes
        for rank, v in self._host_ranked(snap):
            if freed >= need_bytes:
                break
            if v.request_id in exclude:
                continue
            nbytes = v.host_tokens * snap.bytes_per_token
            if rank >= 2 and nbytes <= ssd_free:
                out.append(Directive(v.request_id, Action.OFFLOAD_TO_SSD))
                ssd_free -= nbytes
            elif rank < 2 or must:
                out.append(Directive(v.request_id, Action.DISCARD, tier=Tier.HOST))
            elif ssd_free <= 0:
                break                                  # sole copies only from here: none may go
            else:
                continue
            freed += nbytes
        return out, freed, {d.request_id for d in out}

    def _prefetch_at(self, snap: KvSnapshot, view: RequestView) -> float:
        off_gpu = max(0, view.context_tokens - view.gpu_tokens) * snap.bytes_per_token
        if self.state.signals.get(view.request_id) is ToolSignal.EXITED:
            return snap.now_s
        left = self.remaining_s(view, snap.now_s)
        back = transfer_time_s(off_gpu, snap.bytes_per_s(Tier.HOST, Tier.GPU))
        return snap.now_s + left - back - PREFETCH_MARGIN_S

    def _next_wake(self, snap: KvSnapshot) -> float | None:
        times = [self._prefetch_at(snap, v) for v in snap.requests
                 if v.state is State.PAUSED and v.gpu_tokens < v.context_tokens
                 and (v.host_tokens or v.ssd_tokens)]
        future = [t for t in times if math.isfinite(t)]
        return max(snap.now_s, min(future)) if future else None

    def _prefetch(self, snap: KvSnapshot) -> Decision:
        room = snap.gpu_free_tokens + snap.gpu_evictable_tokens - int(PREFETCH_HEADROOM * snap.gpu_capacity_tokens)
        out = []
        due = [v for v in snap.requests
               if v.state is State.PAUSED and v.gpu_tokens < v.context_tokens and (v.host_tokens or v.ssd_tokens)
               and self._prefetch_at(snap, v) <= snap.now_s]
        for v in sorted(due, key=lambda v: v.session_start_s):
            want = v.context_tokens - v.gpu_tokens
            if want <= room:
                out.append(Directive(v.request_id, Action.PREFETCH))
                room -= want
        wake = [self._prefetch_at(snap, v) for v in snap.requests
                if v.state is State.PAUSED and v.gpu_tokens < v.context_tokens and (v.host_tokens or v.ssd_tokens)
                and v.request_id not in {d.request_id for d in out}]
        future = [t for t in wake if math.isfinite(t) and t > snap.now_s]
        if len(out) < len(due):
            future.append(snap.now_s + PREFETCH_RETRY_S)      # due but no room yet
        return Decision(tuple(out), wake_at_s=min(future) if future else None)

    def waiting_key(self, view: RequestView) -> tuple:
        # Continuum's order: preempted first, then KV kept on the GPU, then program FCFS.
        if self.queue == "pinned":
            resident = view.pinned and view.gpu_tokens > 0
        else:
            resident = view.gpu_tokens > 0 and view.gpu_tokens >= view.context_tokens
        return (0 if view.preempted_s is not None else 1 if resident else 2, view.session_start_s)
