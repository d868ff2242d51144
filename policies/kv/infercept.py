"""InferCept (WukLab/InferCept @3a1a4da, `--api-policy V --chunk-fill`) as a KV policy.

From vllm/core/scheduler_v2.py (`discard_waste`, `_set_max_ragged_batch`,
`_active_discard`, `passive_discard_by_order`): every pause starts as PRESERVE and is
re-evaluated; waste is in token·seconds (bytes per token never appear):

    preserve  W_p = R·x                       R: seconds left in the call, x = n·B tokens
    discard   c_h = max(L - running_batch, 1), k = max(ceil(x/c_h) - 1, 0), r = x mod c_h
              f_s = (a·L + c)/1000, f_ch = a·c_h/1000
              W_d = f_s·c_h·k(k+1)/2 + f_ch·k·RT + (a·r/1000)·(RT + r)

If W_d < W_p the request is a candidate: all candidates but the one with the largest W_d
are discarded now (recompute on return, head of the waiting queue); that one stays on
the GPU as the swap target, whose tail blocks are swapped out under memory pressure
within the per-iteration budget t_out = (1+a')·L + b' - F/2 tokens (F free GPU tokens).
If W_d >= W_p it is preserved and never swapped. When the host is short, paused swapped
requests with the longest R lose their host copy first. When nothing is left to swap, the
engine below it (vLLM 0.2, no prefix cache) preempts the newest running request and
recomputes it.

ORACLE: R comes from the trace's recorded tool duration (`api_exec_time`), as in the
released code; the view's `tool_remaining_s` carries it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from agentcg.engine_protocol import Action, ComputeCost, Directive, RequestEvent, Tier
from agentcg.policies.kv.types import NO_DECISION, Decision, KvSnapshot, RequestView, State, Trigger
from agentcg.policies.kv.vllm_v1 import pick_victim


@dataclass(frozen=True)
class InferceptParams:
    """Constants that InferCept patches in per model with sed (exps/*_bench.sh); the
    defaults are its 6B row. a, c: ms per token and ms per iteration of a chunk;
    a', b': the swap budget fit; L: tokens per iteration; B: block size."""

    a: float = 0.0463
    c: float = 10.0
    a_swap: float = 0.00462
    b_swap: float = 108.99
    chunk_tokens: int = 384
    block_tokens: int = 16

    @classmethod
    def from_cost(cls, cost: ComputeCost, bytes_per_token: int, d2h_bytes_per_s: float,
                  typical_context_tokens: int, block_tokens: int = 16) -> "InferceptParams":
        """Calibrate to an engine the way InferCept's per-model fits do: a, c from the
        step-time model at a typical context, L = the engine's token budget per
        iteration, and the swap budget = the tokens the link moves during one iteration
        of L tokens (t_in at F=0 = a'·L + b')."""
        a_ms = (cost.token_s + cost.prefill_attn_s_per_token_pos * typical_context_tokens) * 1000
        c_ms = cost.step_fixed_s * 1000
        ms_per_token_moved = bytes_per_token / d2h_bytes_per_s * 1000
        return cls(a=a_ms, c=c_ms, a_swap=a_ms / ms_per_token_moved, b_swap=c_ms / ms_per_token_moved,
                   chunk_tokens=cost.max_batched_tokens, block_tokens=block_tokens)


def preserve_waste(remaining_s: float, tokens: int) -> float:
    return max(0.0, remaining_s) * tokens


def discard_waste(p: InferceptParams, tokens: int, running_batch: int, running_kv_tokens: int) -> float:
    c_h = max(p.chunk_tokens - running_batch, 1)
    k = max(math.ceil(tokens / c_h) - 1, 0)
    r = tokens % c_h
    f_s = (p.a * p.chunk_tokens + p.c) / 1000
    f_ch = p.a * c_h / 1000
    return f_s * c_h * k * (k + 1) / 2 + f_ch * k * running_kv_tokens + (p.a * r / 1000) * (running_kv_tokens + r)


def swap_budget_blocks(p: InferceptParams, free_tokens: int) -> tuple[int, int]:
    """(blocks out, blocks in) that one iteration may swap."""
    t_out = (1 + p.a_swap) * p.chunk_tokens + p.b_swap - free_tokens / 2
    t_in = p.a_swap * p.chunk_tokens + p.b_swap + free_tokens / 2
    return max(0, math.floor(t_out / p.block_tokens)), max(0, math.floor(t_in / p.block_tokens))


PRESERVE, TARGET, SWAPPED, RECOMPUTE = "preserve", "target", "swapped", "recompute"


class InferceptPolicy:
    name = "infercept"
    shares_host_memory = False

    def __init__(self, params: InferceptParams | None = None) -> None:
        self.params = params or InferceptParams()
        self.mode: dict[str, str] = {}          # request -> PRESERVE/TARGET/SWAPPED/RECOMPUTE
        self.target: str | None = None
        self.swapped_out_at: dict[float, int] = {}  # iteration (now_s) -> blocks already swapped

    def decide(self, snap: KvSnapshot) -> Decision:
        if snap.trigger is Trigger.PAUSE and snap.subject is not None:
            return self._pause(snap)
        if snap.trigger is Trigger.PRESSURE:
            return self._pressure(snap)
        if snap.trigger is Trigger.TICK:
            return self._reevaluate(snap)
        return NO_DECISION

    def _wastes(self, snap: KvSnapshot, view: RequestView) -> tuple[float, float]:
        remaining = view.tool_remaining_s if view.tool_remaining_s is not None else 0.0
        w_p = preserve_waste(remaining, view.gpu_tokens)
        w_d = discard_waste(self.params, view.gpu_tokens, snap.running_batch_tokens, snap.running_kv_tokens)
        return w_p, w_d

    def _pause(self, snap: KvSnapshot) -> Decision:
        view = snap.view(snap.subject)
        if view is None:
            return NO_DECISION
        rid = view.request_id
        w_p, w_d = self._wastes(snap, view)
        if w_d >= w_p:
            self.mode[rid] = PRESERVE
            return Decision((Directive(rid, Action.KEEP),))
        directives = [Directive(rid, Action.KEEP)]
        old = snap.view(self.target) if self.target is not None else None
        if old is not None and old.state is State.PAUSED and self.mode.get(old.request_id) == TARGET:
            _, old_w_d = self._wastes(snap, old)
            loser, winner = (rid, old.request_id) if w_d <= old_w_d else (old.request_id, rid)
        else:
            loser, winner = None, rid
        self.target = winner
        self.mode[winner] = TARGET
        if loser is not None:
            self.mode[loser] = RECOMPUTE
            directives.append(Directive(loser, Action.DISCARD))
        return Decision(tuple(directives), wake_at_s=self._break_even_s(snap))

    def _break_even_s(self, snap: KvSnapshot) -> float | None:
        view = snap.view(self.target)
        if view is None or view.tool_remaining_s is None or view.gpu_tokens == 0:
            return None
        _, w_d = self._wastes(snap, view)
        return snap.now_s + max(0.0, view.tool_remaining_s - w_d / view.gpu_tokens) + 1e-6

    def _reevaluate(self, snap: KvSnapshot) -> Decision:
        """Under V every paused request on the GPU is re-evaluated each iteration: those whose
        discard waste is below their preserve waste are candidates; the largest-W_d one is
        the swap target, the other candidates are discarded, the rest stay preserved."""
        wastes = {v.request_id: self._wastes(snap, v) for v in snap.requests
                  if v.state is State.PAUSED and v.gpu_tokens > 0 and self.mode.get(v.request_id) != RECOMPUTE}
        candidates = sorted((w_d, rid) for rid, (w_p, w_d) in wastes.items() if w_d < w_p)
        for rid, (w_p, w_d) in wastes.items():
            if w_d >= w_p:
                self.mode[rid] = PRESERVE
        if self.target not in wastes or self.mode.get(self.target) == PRESERVE:
            self.target = None
        if not candidates:
            return NO_DECISION
        winner = candidates[-1][1]
        directives = []
        for _, rid in candidates:
            if rid != winner:
                self.mode[rid] = RECOMPUTE
                directives.append(Directive(rid, Action.DISCARD))
        if self.mode.get(winner) != SWAPPED:
            self.mode[winner] = TARGET
        self.target = winner
        return Decision(tuple(directives), wake_at_s=self._break_even_s(snap))

    def _pressure(self, snap: KvSnapshot) -> Decision:
        requester = snap.view(snap.subject)
        if requester is None or requester.state is not State.RUNNING:
            return NO_DECISION
        reevaluated = self._reevaluate(snap)
        if reevaluated.directives:
            return reevaluated
        target = snap.view(self.target)
        used = self.swapped_out_at.get(snap.now_s, 0)
        budget_out, _ = swap_budget_blocks(self.params, snap.gpu_free_tokens)
        B = self.params.block_tokens
        if target is not None and target.state is State.PAUSED and target.gpu_tokens > 0 and used < budget_out:
            blocks = min(budget_out - used, math.ceil(snap.need_tokens / B), math.ceil(target.gpu_tokens / B))
            tokens = min(blocks * B, target.gpu_tokens)
            directives = self._make_host_room(snap, tokens * snap.bytes_per_token, target.request_id)
            if directives is not None:
                self.swapped_out_at = {snap.now_s: used + blocks}
                self.mode[target.request_id] = SWAPPED
                directives.append(Directive(target.request_id, Action.SWAP_TO_HOST, tokens=tokens))
                return Decision(tuple(directives))
        victim = pick_victim([v for v in snap.requests if v.state is State.RUNNING])
        if victim is None:
            return NO_DECISION
        return Decision((Directive(victim.request_id, Action.PREEMPT, tier=Tier.NONE),))

    def _make_host_room(self, snap: KvSnapshot, nbytes: int, keep: str) -> list[Directive] | None:
        free = snap.host_free_bytes
        if free >= nbytes:
            return []
        out: list[Directive] = []
        holders = [v for v in snap.requests
                   if v.host_tokens > 0 and v.request_id != keep and v.state is State.PAUSED]
        holders.sort(key=lambda v: -(v.tool_remaining_s or 0.0))
        for v in holders:
            out.append(Directive(v.request_id, Action.DISCARD, tier=Tier.HOST))
            self.mode[v.request_id] = RECOMPUTE
            free += v.host_tokens * snap.bytes_per_token
            if free >= nbytes:
                return out
        return None

    def observe(self, event: RequestEvent) -> None:
        if event.kind.value in ("admitted", "finished"):
            self.mode.pop(event.request_id, None)
            if self.target == event.request_id:
                self.target = None

    def waiting_key(self, view: RequestView) -> tuple:
        # Fill order of each iteration: running (preserved), then swapped, then waiting,
        # where resumed recomputes and preempted requests sit at the head.
        mode = self.mode.get(view.request_id)
        if view.gpu_tokens and view.pinned:
            rank = 0
        elif view.host_tokens or mode == SWAPPED:
            rank = 1
        elif mode == RECOMPUTE or view.preempted_s is not None:
            rank = 2
        else:
            rank = 3
        return (rank, view.arrival_s)
