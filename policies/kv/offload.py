"""vLLM's native CPU offloading (`--kv-offloading-size <GiB>`, `--kv-offloading-backend
native`: `OffloadingConnector`, vllm 0.33.0, see ../shared/references/engines.md) on top
of a scheduling policy (vllm-v1 FCFS, or Continuum's pins).

What the connector does, as modelled here:
- A fixed host pool (`cpu_bytes_to_use`), allocated when the engine starts: its whole size
  is host RAM the sandboxes cannot use (the simulator charges it), whether or not it holds KV.
- Stores a finished turn's blocks: on every pause, the blocks the host copy lacks are
  written (SWAP_TO_HOST with keep_gpu_copy: the GPU blocks stay in the prefix cache).
  The connector stores full blocks as they are computed; at the granularity of turns that
  is the same bytes, written by the end of the turn.
- LRU eviction (`lru`; `arc` is not modelled): when a store does not fit, the least
  recently used host copies (stored or hit longest ago) are dropped, whole, until it fits;
  a copy larger than the whole pool is not stored.
- Loads on a hit before prefill: when the request is scheduled again and its prefix is no
  longer on the GPU, the host copy is loaded first (the engine does this for every
  policy: `get_num_new_matched_tokens` + async load, the request waits for the load), so
  the load time is on the request's critical path, as in vLLM.
- No oracle; it does not know about the sandboxes or the tool calls.
"""
from __future__ import annotations

from collections import OrderedDict

from agentcg.engine_protocol import Action, Directive, EventKind, RequestEvent, Tier
from agentcg.policies.kv.types import Decision, KvPolicy, KvSnapshot, Trigger


class NativeOffloadPolicy:
    shares_host_memory = False
    host_tier = True

    def __init__(self, inner: KvPolicy, name: str) -> None:
        self.inner = inner
        self.name = name
        self.lru: OrderedDict[str, None] = OrderedDict()   # request -> None, least recently used first

    def observe(self, event: RequestEvent) -> None:
        self.inner.observe(event)
        rid = event.request_id
        if event.kind in (EventKind.PAUSED, EventKind.ADMITTED):   # stored, or hit (loaded)
            self.lru[rid] = None
            self.lru.move_to_end(rid)
        elif event.kind is EventKind.FINISHED:
            self.lru.pop(rid, None)

    def waiting_key(self, view) -> tuple:
        return self.inner.waiting_key(view)

    def decide(self, snap: KvSnapshot) -> Decision:
        decision = self.inner.decide(snap)
        if snap.trigger is not Trigger.PAUSE or snap.subject is None:
            return decision
        store = self.store(snap, snap.subject)
        return Decision(tuple(decision.directives) + tuple(store), decision.wake_at_s)

    def store(self, snap: KvSnapshot, rid: str) -> list[Directive]:
        """The connector's store of `rid`'s finished blocks, after LRU evictions."""
        view = snap.view(rid)
        if view is None or view.gpu_tokens <= 0:
            return []
        have = view.host_tokens if view.host_tokens <= view.gpu_tokens else 0
        missing = (view.gpu_tokens - have) * snap.bytes_per_token
        if missing <= 0:
            return []
        # Re-storing the whole copy replaces the old one (its bytes come back).
        size = view.gpu_tokens * snap.bytes_per_token
        if size > snap.host_capacity_bytes:
            return []
        short = snap.host_used_bytes - view.host_tokens * snap.bytes_per_token + size - snap.host_capacity_bytes
        out: list[Directive] = []
        holders = {v.request_id: v for v in snap.requests if v.host_tokens > 0 and v.request_id != rid}
        order = [r for r in self.lru if r in holders] + [r for r in holders if r not in self.lru]
        for victim in order:
            if short <= 0:
                break
            out.append(Directive(victim, Action.DISCARD, tier=Tier.HOST))
            short -= holders[victim].host_tokens * snap.bytes_per_token
        if short > 0:
            return []
        out.append(Directive(rid, Action.SWAP_TO_HOST, keep_gpu_copy=True))
        return out
