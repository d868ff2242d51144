"""The connector's scheduler side, without vLLM: sessions, their KV and the daemon's decisions.

vLLM calls the connector's scheduler hooks on its scheduler thread; `SchedulerSide` holds
what they need and is driven by them (connector.py only adapts vLLM's objects). Nothing
here imports vLLM: a request is any object with vLLM Request's attributes, the block pool
any object with `blocks`, `touch`, `free_blocks`, `get_num_free_blocks`, `get_usage`.

Sessions. An agent session's LLM calls are separate vLLM requests that extend one context.
The session of a request is, in order: `kv_transfer_params["agentcg_session"]`, vLLM's own
`session_id` (the OpenAI body's `session_id`), else none. Its sandbox is
`kv_transfer_params["agentcg_sandbox"]`, else the session id (agentcg's one-sandbox-per-
session case). A request with no session is reported (lifecycle, llm_request) under its own
request id and left to plain vLLM: nothing is kept or offloaded for it. On the engine
protocol a session is one request (`request_id` = "vllm:<session>"), as the reference engine
and the policies see an agent session.

What the connector does with a finished call's KV (its full, computed blocks):
- keep: it takes one reference on each block (`touch`), so vLLM's prefix cache cannot evict
  them; the next call of the session hits them as a local prefix. Released (`free_blocks`:
  back to the prefix cache, evictable) when the daemon says so (keep ttl 0, discard, a
  ttl that ran out), when the next call has been allocated, when vLLM is short of blocks
  (`has_pending_block_frees`, or a waiting request not admitted), or when the link is down.
- offload: a save job for the worker (blocks -> agentcg's store, host or SSD); when the
  worker reports it done, the reference is released. The next call of the session then
  gets the stored tokens from `get_num_new_matched_tokens` beyond vLLM's own prefix hit and
  a load job copies them into the blocks vLLM allocated (a synchronous load, before the
  forward). The stored token ids are compared with the new prompt: a prefix that differs
  is not loaded.
- prefetch and preempt are refused: vLLM allocates a request's blocks only when it is
  scheduled, and no API preempts one running request from a connector.
Before the daemon's first decision on a pause the blocks are kept for `hold_s`; with no
daemon, nothing is kept (plain vLLM).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from agentcg.engine_protocol import (
    Action, Directive, DirectiveResult, EventKind, KvTransfer, KvUsage, LlmRequest, Message, RequestEvent, Tier,
)
from agentcg.gpu.vllm.datapath import HOST, SSD, JobResult, LoadJob, MoveJob, SaveJob

log = logging.getLogger("agentcg.vllm.scheduler")

MAX_SESSIONS = 4000           # below the daemon's default [engine] max_requests (4096)
KEY_PREFIX = "vllm:"


def session_of(request: Any) -> tuple[str | None, str | None]:
    """(session id, sandbox) of a vLLM request; (None, None) when it names no session."""
    params = getattr(request, "kv_transfer_params", None) or {}
    if not isinstance(params, dict):
        params = {}
    session = params.get("agentcg_session") or getattr(request, "session_id", None)
    if not isinstance(session, str) or not session or len(session) > 512:
        return None, None
    sandbox = params.get("agentcg_sandbox")
    if not isinstance(sandbox, str) or not sandbox or len(sandbox) > 512:
        sandbox = session
    return session, sandbox


@dataclass
class Live:
    """One vLLM request being served."""

    request: Any
    key: str                         # protocol request id (the session's, or its own)
    session: str | None
    sandbox: str | None
    arrival_s: float
    cached_tokens: int = 0           # local prefix hit
    loaded_tokens: int = 0           # external (agentcg) tokens
    asked_step: int = -1             # step of the last get_num_new_matched_tokens
    local_hit: int = 0               # the block-aligned local hit vLLM gave with it
    admitted: bool = False
    first_token_s: float | None = None
    preemptions: int = 0


@dataclass
class Session:
    key: str
    session: str
    sandbox: str | None
    tokens: tuple[int, ...] = ()     # token ids whose KV the last call left (full blocks)
    pinned: list[int] = field(default_factory=list)   # vLLM block ids we hold a reference on
    pinned_s: float | None = None
    paused_s: float | None = None
    keep_until_s: float | None = None                  # None: until resumed (with pins)
    decided: bool = False                              # the daemon answered since the pause
    stored_tier: str | None = None                     # host / ssd: a store copy of `stored_tokens`
    stored_tokens: tuple[int, ...] = ()
    pending: dict[int, Directive | None] = field(default_factory=dict)   # job id -> directive
    live: str | None = None                            # the vLLM request serving it now
    paused: bool = False
    drop_pins_after_save: bool = True


class SchedulerSide:
    def __init__(self, block_size: int, send: Callable[[Message], bool], link_up: Callable[[], bool], *,
                 hold_s: float = 30.0, has_ssd: bool = False, has_host: bool = True, idle_s: float = 600.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.bs = block_size
        self.idle_s = idle_s     # a paused session this long without a new call is finished
        self.send, self.link_up, self.clock = send, link_up, clock
        self.hold_s = hold_s
        self.has_ssd, self.has_host = has_ssd, has_host
        self.pool: Any = None
        self.live: dict[str, Live] = {}
        self.sessions: dict[str, Session] = {}
        self.step = 0
        self._next_job = 0
        self.save_jobs: list[SaveJob] = []
        self.move_jobs: list[MoveJob] = []
        self.load_jobs: list[LoadJob] = []
        self.jobs_in_flight: dict[int, str] = {}
        self.counts = {"kept": 0, "released": 0, "saved": 0, "loaded": 0, "load_failed": 0, "refused": 0,
                       "pressure_releases": 0}
        self._was_up = False

    # ---- helpers -----------------------------------------------------------------------
    def _job_id(self) -> int:
        self._next_job += 1
        return self._next_job

    def _event(self, key: str, session: str, kind: EventKind, context: int, sandbox: str | None,
               cached: int | None = None) -> None:
        self.send(RequestEvent(key, session, kind, self.clock(), context, sandbox=sandbox, cached_tokens=cached))

    def _usage(self, s: Session) -> None:
        gpu = len(s.pinned) * self.bs
        stored = len(s.stored_tokens)
        self.send(KvUsage(s.key, self.clock(), gpu_tokens=gpu,
                          host_tokens=stored if s.stored_tier == HOST else 0,
                          ssd_tokens=stored if s.stored_tier == SSD else 0, pinned=bool(s.pinned)))

    def _result(self, d: Directive, ok: bool, reason: str | None = None) -> None:
        if not ok:
            self.counts["refused"] += 1
        self.send(DirectiveResult(d.request_id, d.action, ok, reason))

    def _release(self, s: Session, why: str) -> int:
        """Give the session's block references back to vLLM (the blocks stay in its prefix
        cache, evictable, tail first)."""
        n = len(s.pinned)
        if n and self.pool is not None:
            self.pool.free_blocks([self.pool.blocks[b] for b in reversed(s.pinned)])
            self.counts["released"] += 1
            log.debug("released %d blocks of %s (%s)", n, s.key, why)
        s.pinned, s.pinned_s, s.keep_until_s = [], None, None
        return n

    def _session(self, session: str, sandbox: str | None) -> Session:
        key = KEY_PREFIX + session
        s = self.sessions.get(key)
        if s is None:
            while len(self.sessions) >= MAX_SESSIONS:
                oldest = next(iter(self.sessions.values()))
                self._forget(oldest)
            s = self.sessions[key] = Session(key, session, sandbox)
        return s

    def _forget(self, s: Session) -> None:
        self._release(s, "forgotten")
        if s.stored_tier is not None:
            self.move_jobs.append(MoveJob(self._job_id(), s.key, "discard"))
        self.sessions.pop(s.key, None)
        self._event(s.key, s.session, EventKind.FINISHED, len(s.tokens), s.sandbox)

    # ---- vLLM's scheduler hooks ------------------------------------------------------
    def new_request(self, request: Any) -> None:
        session, sandbox = session_of(request)
        rid = request.request_id
        key = KEY_PREFIX + session if session else rid
        wall_age = max(0.0, time.time() - float(getattr(request, "arrival_time", time.time()) or time.time()))
        live = Live(request, key, session, sandbox, self.clock() - wall_age)
        self.live[rid] = live
        if session:
            s = self._session(session, sandbox)
            s.live = rid
            if s.paused:
                s.paused = False
                self._event(key, session, EventKind.RESUMED, len(getattr(request, "prompt_token_ids", ()) or ()),
                            sandbox)

    def matched_tokens(self, request: Any, num_computed: int) -> int:
        """get_num_new_matched_tokens: stored tokens of the session beyond vLLM's own hit."""
        self.apply_directives()
        live = self.live.get(request.request_id)
        if live is None:
            self.new_request(request)
            live = self.live[request.request_id]
        live.asked_step = self.step
        live.local_hit = num_computed
        s = self.sessions.get(live.key) if live.session else None
        if s is None or s.stored_tier is None or not self.link_up() or s.pending:
            return 0
        prompt = list(getattr(request, "prompt_token_ids", None) or ())
        limit = ((len(prompt) - 1) // self.bs) * self.bs      # vLLM computes the last prompt token
        n = 0
        stored = s.stored_tokens
        top = min(limit, len(stored))
        while n < top and prompt[n] == stored[n]:
            n += 1
        n = (n // self.bs) * self.bs
        return max(0, n - num_computed)

    def after_alloc(self, request: Any, block_ids: list[int], num_external: int) -> None:
        live = self.live.get(request.request_id)
        if live is None:
            return
        local = live.local_hit
        s = self.sessions.get(live.key) if live.session else None
        if num_external > 0 and s is not None:
            first = local // self.bs
            count = num_external // self.bs
            ids = tuple(block_ids[first: first + count])
            if len(ids) == count:
                job = LoadJob(self._job_id(), s.key, first, ids)
                self.load_jobs.append(job)
                self.jobs_in_flight[job.job_id] = s.key
                s.pending[job.job_id] = None
                live.loaded_tokens = num_external
        if not live.admitted:
            live.admitted = True
            live.cached_tokens = local
            context = len(getattr(request, "prompt_token_ids", ()) or ())
            self._event(live.key, live.session or live.key, EventKind.ADMITTED, context, live.sandbox,
                        cached=local + num_external)
        if s is not None and s.pinned:
            # The new call holds its own references on the blocks it hit; ours can go.
            self._release(s, "resumed")
            self._usage(s)

    def finished(self, request: Any, block_ids: list[int]) -> None:
        """request_finished: report the call; keep its full blocks for the session."""
        rid = request.request_id
        live = self.live.pop(rid, None)
        if live is None:
            session, sandbox = session_of(request)
            live = Live(request, KEY_PREFIX + session if session else rid, session, sandbox, self.clock())
        prompt = list(getattr(request, "prompt_token_ids", None) or ())
        outputs = int(getattr(request, "num_output_tokens", 0) or 0)
        reason = request.get_finished_reason() if hasattr(request, "get_finished_reason") else None
        now = self.clock()
        stats = getattr(request, "prefill_stats", None)      # vLLM's own count of the first prefill
        cached = getattr(stats, "num_local_cached_tokens", None)
        loaded = getattr(stats, "num_external_cached_tokens", None)
        self.send(LlmRequest(rid, live.session or live.key, now, prompt_tokens=len(prompt), output_tokens=outputs,
                             cached_tokens=live.cached_tokens if cached is None else int(cached),
                             loaded_tokens=live.loaded_tokens if loaded is None else int(loaded),
                             preemptions=int(getattr(request, "num_preemptions", 0) or 0), sandbox=live.sandbox,
                             arrival_s=live.arrival_s, first_token_s=live.first_token_s, end_s=now,
                             finish_reason=str(reason)[:64] if reason is not None else None))
        if not live.session:
            self._event(live.key, live.key, EventKind.FINISHED, len(prompt) + outputs, None)
            return
        s = self._session(live.session, live.sandbox)
        if s.live == rid:
            s.live = None
        computed = int(getattr(request, "num_computed_tokens", 0) or 0)
        n_full = min(computed // self.bs, len(block_ids))
        all_tokens = list(getattr(request, "all_token_ids", None) or prompt)
        self._release(s, "superseded")
        s.tokens = tuple(all_tokens[: n_full * self.bs])
        s.paused, s.decided, s.paused_s = True, False, now
        if self.link_up() and self.pool is not None and n_full:
            blocks = [self.pool.blocks[b] for b in block_ids[:n_full]]
            held = []
            for b in blocks:
                if getattr(b, "block_hash", None) is None:
                    break           # only cached (hashed) blocks are worth keeping
                held.append(b)
            if held:
                self.pool.touch(held)
                s.pinned = [b.block_id for b in held]
                s.pinned_s = now
                s.keep_until_s = now + self.hold_s
                self.counts["kept"] += 1
        self._event(s.key, s.session, EventKind.PAUSED, computed, s.sandbox)
        self._usage(s)

    def build(self, scheduler_output: Any) -> tuple[list[SaveJob], list[MoveJob], list[LoadJob]]:
        """build_connector_meta: this step's jobs for the worker, and the step's bookkeeping."""
        self.apply_directives()
        now = self.clock()
        up = self.link_up()
        if self._was_up and not up:
            for s in self.sessions.values():
                self._release(s, "daemon link down")
        self._was_up = up
        starved = False
        for live in self.live.values():
            r = live.request
            if live.first_token_s is None and int(getattr(r, "num_output_tokens", 0) or 0) > 0:
                live.first_token_s = now
            p = int(getattr(r, "num_preemptions", 0) or 0)
            if p > live.preemptions:
                live.preemptions = p
                live.admitted = False
                self._event(live.key, live.session or live.key, EventKind.PREEMPTED,
                            int(getattr(r, "num_computed_tokens", 0) or 0), live.sandbox)
            if live.asked_step == self.step and not live.admitted:
                starved = True      # asked this step and not allocated: vLLM is short of blocks
        for s in list(self.sessions.values()):
            if s.pinned and s.keep_until_s is not None and now >= s.keep_until_s:
                self._release(s, "keep ran out")
                self._usage(s)
            if s.paused and s.live is None and not s.pending and s.paused_s is not None \
                    and now - s.paused_s >= self.idle_s:
                self._forget(s)      # FINISHED: the agent did not come back
        if starved:
            self.release_for_pressure()
        self.step += 1
        out = (self.save_jobs, self.move_jobs, self.load_jobs)
        self.save_jobs, self.move_jobs, self.load_jobs = [], [], []
        return out

    def release_for_pressure(self) -> bool:
        """vLLM is short of blocks. The oldest kept session's blocks go: swapped to the host
        tier first when it has no copy there and the host tier exists (vLLM waits a step
        for them instead of preempting), else released at once. True when blocks will be
        freed (now or when a save lands)."""
        if any(s.pending and s.pinned and s.drop_pins_after_save for s in self.sessions.values()):
            return True          # a save in flight frees its blocks when it lands
        held = sorted((s for s in self.sessions.values() if s.pinned and not s.pending),
                      key=lambda s: s.pinned_s or 0.0)
        if not held:
            return False
        s = held[0]
        self.counts["pressure_releases"] += 1
        if self.has_host and self.link_up() and s.stored_tier is None:
            job_id = self._job_id()
            self.save_jobs.append(SaveJob(job_id, s.key, tuple(s.pinned), HOST))
            s.pending[job_id] = None
            s.drop_pins_after_save, s.keep_until_s = True, None
            self.jobs_in_flight[job_id] = s.key
            return True
        self._release(s, "vLLM short of blocks")
        self._usage(s)
        return True

    def has_pending_work(self) -> bool:
        return bool(self.save_jobs or self.move_jobs or self.load_jobs or self.jobs_in_flight)

    # ---- worker results --------------------------------------------------------------
    def results(self, results: list[JobResult]) -> None:
        for r in results:
            key = self.jobs_in_flight.pop(r.job_id, r.key)
            s = self.sessions.get(key)
            directive = s.pending.pop(r.job_id, None) if s is not None else None
            src_dst = {"swap_out": (Tier.GPU, Tier.HOST), "offload": (Tier.GPU, Tier.SSD),
                       "load": (Tier.HOST, Tier.GPU), "discard": (Tier.HOST, Tier.NONE)}
            for src, dst, nbytes, seconds in r.legs:
                self.send(KvTransfer(key, r.op if src != dst else ("gather" if r.op != "load" else "scatter"),
                                     _tier(src), _tier(dst), r.blocks, nbytes, max(0.0, seconds), ok=True))
            if not r.ok:
                self.send(KvTransfer(key, r.op, *src_dst.get(r.op, (Tier.GPU, Tier.HOST)), r.blocks, 0, 0.0,
                                     ok=False, reason=(r.reason or "failed")[:1000]))
            if r.op == "load":
                self.counts["loaded" if r.ok else "load_failed"] += 1
                if s is not None:
                    s.stored_tier, s.stored_tokens = None, ()
            elif r.op in ("swap_out", "offload") and s is not None:
                if r.ok:
                    self.counts["saved"] += 1
                    s.stored_tier = HOST if r.op == "swap_out" else SSD
                    s.stored_tokens = s.tokens[: r.blocks * self.bs] if s.tokens else s.stored_tokens
                    if s.drop_pins_after_save:
                        self._release(s, "saved")
                else:
                    s.stored_tier, s.stored_tokens = None, ()
                    if directive is None:          # a save for vLLM's block shortage: free them anyway
                        self._release(s, "save for pressure failed")
            elif r.op == "discard" and s is not None and r.ok:
                s.stored_tier, s.stored_tokens = None, ()
            if directive is not None:
                self._result(directive, r.ok, r.reason)
            if s is not None:
                self._usage(s)

    # ---- the daemon's directives -----------------------------------------------------
    def apply_directives(self, directives: list[Directive] | None = None) -> None:
        for d in directives if directives is not None else self.take():
            try:
                self._apply(d)
            except Exception as exc:     # a bug here must not break vLLM's scheduler
                log.exception("applying %s for %s failed", d.action.value, d.request_id)
                self._result(d, False, f"internal: {type(exc).__name__}: {exc}")

    take: Callable[[], list[Directive]] = staticmethod(lambda: [])   # replaced by the connector

    def _apply(self, d: Directive) -> None:
        s = self.sessions.get(d.request_id)
        if s is None:
            self._result(d, False, f"unknown request {d.request_id}: not a session this vLLM serves "
                                   "(finished, forgotten, or from before a restart)")
            return
        s.decided = True
        a = d.action
        if a is Action.KEEP:
            if not s.pinned:
                self._result(d, False, "no GPU KV held for this session: vLLM freed its blocks already")
                return
            if d.ttl_s is None:
                s.keep_until_s = None
            elif d.ttl_s == 0:
                self._release(s, "keep ttl 0")
            else:
                s.keep_until_s = self.clock() + d.ttl_s
            self._result(d, True)
            self._usage(s)
        elif a in (Action.SWAP_TO_HOST, Action.OFFLOAD_TO_SSD):
            dst = HOST if a is Action.SWAP_TO_HOST else SSD
            if dst == SSD and not self.has_ssd:
                self._result(d, False, "no SSD tier: give the connector ssd_dir and ssd_bytes")
                return
            if dst == HOST and not self.has_host:
                self._result(d, False, "no host tier: the connector's host_bytes is 0")
                return
            if s.live is not None and not s.paused:
                self._result(d, False, "the session's request is running; vLLM moves only a finished call's KV")
                return
            if s.pending:
                self._result(d, False, "a move of this session's KV is in flight")
                return
            if s.pinned:
                job_id = self._job_id()
                self.save_jobs.append(SaveJob(job_id, s.key, tuple(s.pinned), dst))
                s.drop_pins_after_save = not d.keep_gpu_copy
                s.keep_until_s = None
            elif dst == SSD and s.stored_tier == HOST:
                job_id = self._job_id()
                self.move_jobs.append(MoveJob(job_id, s.key, "offload"))
            else:
                self._result(d, False, "no GPU KV held for this session: vLLM freed its blocks already")
                return
            s.pending[job_id] = d
            self.jobs_in_flight[job_id] = s.key
        elif a is Action.DISCARD:
            if d.tier in (None, Tier.GPU):
                self._release(s, "discard")
            if d.tier in (None, Tier.HOST, Tier.SSD) and s.stored_tier is not None \
                    and (d.tier is None or d.tier.value == s.stored_tier) and not s.pending:
                job_id = self._job_id()
                self.move_jobs.append(MoveJob(job_id, s.key, "discard"))
                s.pending[job_id] = d
                self.jobs_in_flight[job_id] = s.key
                return
            self._result(d, True)
            self._usage(s)
        elif a is Action.PREFETCH:
            self._result(d, False, "vLLM allocates a request's blocks only when it is scheduled; the stored "
                                   "KV is loaded then")
        else:
            self._result(d, False, "vLLM has no API to preempt one running request from a connector")

    # ---- re-reporting after a (re)attach ---------------------------------------------
    def resync(self) -> None:
        """After the daemon (re)attached: report every session this vLLM still has."""
        for s in list(self.sessions.values()):
            if s.paused:
                self._event(s.key, s.session, EventKind.PAUSED, len(s.tokens), s.sandbox)
                self._usage(s)


def _tier(name: str) -> Tier:
    return {"device": Tier.GPU, "gpu": Tier.GPU, "host": Tier.HOST, "ssd": Tier.SSD}.get(name, Tier.NONE)

