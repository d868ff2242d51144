"""vLLM V1's behaviour as a KV policy: keep until the pool is full, preempt the newest,
recompute (vllm/v1/core/sched/scheduler.py `schedule()` and `_preempt_request()`).

- A finished call's blocks go to the prefix cache (refcount 0, hashes kept): KEEP with
  ttl 0, i.e. evictable at once, LRU, tail blocks first (the engine's allocator).
- Only a RUNNING request that cannot allocate preempts: `fcfs` takes the newest admitted,
  `priority` the largest (priority, arrival). One victim per call; the engine retries.
  A WAITING request preempts no one.
- The victim's blocks go back to the prefix cache (PREEMPT to tier gpu) and it is put at
  the head of the waiting queue; on resume it recomputes what the cache lost.
"""
from __future__ import annotations

from agentcg.engine_protocol import Action, Directive, RequestEvent, Tier
from agentcg.policies.kv.types import NO_DECISION, Decision, KvSnapshot, RequestView, State, Trigger

MODES = ("fcfs", "priority")


def prefix_hit_tokens(cached_tokens: int, prompt_tokens: int, block_tokens: int) -> int:
    """What `get_computed_blocks` can reuse: full blocks only, and at most prompt - 1
    tokens (the last token is always computed to produce logits)."""
    usable = min(cached_tokens, prompt_tokens - 1)
    return max(0, usable // block_tokens * block_tokens)


def pick_victim(running: list[RequestView], mode: str = "fcfs") -> RequestView | None:
    if not running:
        return None
    if mode == "priority":
        return max(running, key=lambda v: (v.priority, v.arrival_s))
    return max(running, key=lambda v: v.admitted_s if v.admitted_s is not None else -1.0)


class VllmV1Policy:
    shares_host_memory = False
    host_tier = False              # no host pool: vLLM V1 without a KV connector

    def __init__(self, mode: str = "fcfs") -> None:
        if mode not in MODES:
            raise ValueError(f"vllm-v1 mode must be one of {MODES}, got {mode!r}")
        self.mode = mode
        # `--scheduling-policy priority`; the user passes the session's order as priority.
        self.name = "vllm-v1" if mode == "fcfs" else "vllm-v1-priority"

    def decide(self, snap: KvSnapshot) -> Decision:
        if snap.trigger is Trigger.PAUSE and snap.subject is not None:
            return Decision((Directive(snap.subject, Action.KEEP, ttl_s=0.0),))
        if snap.trigger is Trigger.PRESSURE:
            requester = snap.view(snap.subject)
            if requester is None or requester.state is not State.RUNNING:
                return NO_DECISION
            victim = pick_victim([v for v in snap.requests if v.state is State.RUNNING], self.mode)
            if victim is None:
                return NO_DECISION
            return Decision((Directive(victim.request_id, Action.PREEMPT, tier=Tier.GPU),))
        return NO_DECISION

    def observe(self, event: RequestEvent) -> None:
        return None

    def waiting_key(self, view: RequestView) -> tuple:
        # priority: the waiting queue is a heap on (priority, arrival); a preempted request
        # is pushed back into it like any other (kv-policies.md section 1).
        if self.mode == "priority":
            return (view.priority, view.arrival_s)
        # fcfs, prepend_request: the latest preempted goes to the head of the deque.
        if view.preempted_s is not None:
            return (0, -view.preempted_s)
        return (1, view.arrival_s)
