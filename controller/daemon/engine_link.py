"""One engine attached to the daemon (docs/daemon-protocol.md, "Engine links").

A client connection becomes an engine link with `engine.attach`; from then on it carries
engine-protocol JSON lines both ways (agentcg.engine_protocol). Each `EngineLink` keeps
the engine's registration, its requests (engine_state.py), a KV policy instance
(engine_policy.py) and counters (engine_counters.py), and answers every message or daemon
hook with the `Directive`s to send. The daemon's loop does the I/O; nothing here touches
a socket; EngineHub (engine.py) holds the links.

The daemon's hooks: a tool call beginning in sandbox S pauses S's running and waiting
requests (PAUSE), its end resumes them (the agentcg policy prefetches on the EXITED
signal), a sandbox policy's freeze or throttle becomes a tool signal, finished tool-call
records teach the policy's duration predictor, and the tick shrinks the host KV pool
when the sandboxes take the shared host memory budget (HOST_PRESSURE).

A KV policy that raises is counted, and vllm-v1 decides instead (the engine's default).
"""
from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any, Callable, Iterable

from agentcg.controller.daemon import engine_state as es
from agentcg.controller.daemon.engine_counters import EngineCounters
from agentcg.controller.daemon.engine_policy import make_kv_policy, policy_label
from agentcg.engine_protocol import (
    Directive, DirectiveResult, EngineStats, EventKind, KvTransfer, KvUsage, LlmRequest, Message, Register,
    RequestEvent,
)
from agentcg.errors import ProtocolError
from agentcg.policies.kv.harness import KvDecider
from agentcg.policies.kv.predictor import ToolSignal, tool_key
from agentcg.policies.kv.types import State, Trigger
from agentcg.records import ToolCallRecord

log = logging.getLogger("agentcg.daemon.engine")

MAX_DIRECTIVES_PER_DECISION = 1024
MAX_LINKED_CALLS = 4096              # tool calls remembered per link as "paused a request"
MIN_WAKE_S = 0.01                    # a policy's wake-up is never sooner than this after now
TIERS = ("gpu", "host", "ssd")       # the KV tiers a request's tokens are reported in

CallsOf = Callable[[str], list[tuple[str, ToolSignal | None]]]   # sandbox -> [(call id, signal)], newest last
# The daemon's event log (CONTRACTS interface 4): append(kind, sandbox, call_id, detail).
AppendEvent = Callable[[str, "str | None", "str | None", dict], None]


class EngineLink:
    """One attached engine: its registration, requests, KV policy and what it was sent."""

    def __init__(self, link_id: int, fd: int, policy_name: str, counters: EngineCounters, max_requests: int,
                 calls_of: CallsOf | None = None, append: AppendEvent | None = None,
                 known_sandbox: Callable[[str], bool] | None = None) -> None:
        self.link_id, self.fd = link_id, fd
        self.calls_of = calls_of         # the daemon's running tool calls of a sandbox
        self.append = append             # the daemon's event log, when it has one
        self.known_sandbox = known_sandbox
        self.stats: EngineStats | None = None        # the engine's last EngineStats (v2)
        self.stats_at_s: float | None = None
        self._unknown_sandboxes: dict[str, None] = {}
        self.policy_name = policy_name
        self.policy_label = policy_label(policy_name)
        self.decider = KvDecider(make_kv_policy(policy_name), min_wake_s=MIN_WAKE_S)   # the one harness
        self.counters = counters
        self.max_requests = max_requests
        self.registration: Register | None = None
        self.requests: dict[str, es.EngineRequest] = {}
        self.wake_at_s: float | None = None
        self.host_share_bytes: int | None = None     # the host pool's share of the host budget
        self.linked_calls: dict[str, None] = {}      # ordered set: calls that paused a request here
        self.sent = 0
        self.refused = 0
        self.failures = 0

    @property
    def policy(self) -> Any:
        return self.decider.policy

    @policy.setter
    def policy(self, policy: Any) -> None:
        self.decider.policy = policy

    @property
    def shares_host_memory(self) -> bool:
        return self.decider.shares_host_memory

    # ---- engine messages ------------------------------------------------------------
    def on_message(self, message: Message, now_s: float) -> list[Directive]:
        """One decoded message from the engine; ProtocolError for one it may not send."""
        if isinstance(message, Register):
            es.check_register(message)
            if self.registration is not None and message.engine_id != self.registration.engine_id:
                raise ProtocolError(f"register: this link belongs to engine {self.registration.engine_id!r}; "
                                    "a second engine needs its own connection")
            self.registration = message        # again: updated capacities or measured bandwidths
            return []
        if self.registration is None:
            raise ProtocolError(f"the first message on an engine link must be register, got "
                                f"{type(message).__name__}")
        if isinstance(message, RequestEvent):
            return self._on_event(message, now_s)
        if isinstance(message, KvUsage):
            if es.apply_usage(self.requests, message) is None:
                self.counters.unknown_usage += 1
            return []
        if isinstance(message, DirectiveResult):
            self.counters.bump(self.counters.results, (message.action.value, "ok" if message.ok else "refused"))
            if not message.ok:
                self.refused += 1
                log.debug("engine link %d refused %s for %s: %s", self.link_id, message.action.value,
                          message.request_id, message.reason)
            r = self.requests.get(message.request_id)
            self._append("kv_directive", r.sandbox if r else None,
                         {"engine_id": self.registration.engine_id, "request_id": message.request_id,
                          "action": message.action.value, "ok": message.ok, "reason": message.reason})
            return []
        if isinstance(message, LlmRequest):
            self._on_llm_request(message)
            return []
        if isinstance(message, KvTransfer):
            self.counters.count_transfer(message)
            return []
        if isinstance(message, EngineStats):
            self.stats, self.stats_at_s = message, now_s
            return []
        raise ProtocolError(f"an engine does not send {type(message).__name__} messages; directives go from "
                            "the daemon to the engine")

    def _sandbox_of(self, sandbox: str | None) -> str | None:
        """The sandbox an engine named. One the daemon does not have (yet: `agentcg run`
        creates a sandbox at its first tool call) is kept as a name and counted once; its
        requests are tracked, and a tool call there pauses them once it exists."""
        if sandbox is None or self.known_sandbox is None or sandbox in self._unknown_sandboxes:
            return sandbox
        try:
            known = self.known_sandbox(sandbox)
        except Exception:   # the daemon's lookup failing must not drop an engine line
            log.exception("sandbox lookup for engine link %d failed", self.link_id)
            return sandbox
        if not known:
            self.counters.unknown_sandbox += 1
            self._unknown_sandboxes[sandbox] = None
            while len(self._unknown_sandboxes) > MAX_LINKED_CALLS:
                del self._unknown_sandboxes[next(iter(self._unknown_sandboxes))]
            log.info("engine link %d: sandbox %r is not one of the daemon's (yet); its requests are tracked "
                     "and paused by its tool calls once it exists", self.link_id, sandbox)
        return sandbox

    def _on_llm_request(self, m: LlmRequest) -> None:
        r = self.requests.get(m.session_id)
        sandbox = (r.sandbox if r is not None else None) or self._sandbox_of(m.sandbox)
        self.counters.count_llm_request(sandbox or "", m)
        ttft = m.first_token_s - m.arrival_s if m.first_token_s is not None and m.arrival_s is not None else None
        e2e = m.end_s - m.arrival_s if m.end_s is not None and m.arrival_s is not None else None
        self._append("llm_request", sandbox, {
            "engine_id": self.registration.engine_id if self.registration else None, "request_id": m.request_id,
            "session_id": m.session_id, "input_tokens": m.prompt_tokens, "context_tokens": m.prompt_tokens,
            "output_tokens": m.output_tokens, "cached_tokens": m.cached_tokens, "loaded_tokens": m.loaded_tokens,
            "preemptions": m.preemptions, "finish_reason": m.finish_reason, "arrival_s": m.arrival_s,
            "start_s": m.arrival_s, "first_token_s": m.first_token_s, "end_s": m.end_s, "ttft_s": ttft, "e2e_s": e2e,
            "duration_s": e2e, "model": self.registration.model if self.registration else None})

    def _append(self, kind: str, sandbox: str | None, detail: dict) -> None:
        if self.append is None:
            return
        try:
            self.append(kind, sandbox, None, detail)
        except Exception:   # the event log must never break the engine link
            log.exception("engine link %d: appending a %s event failed", self.link_id, kind)

    def _on_event(self, event: RequestEvent, now_s: float) -> list[Directive]:
        self._sandbox_of(event.sandbox)
        if event.kind is EventKind.PREEMPTED:
            known = self.requests.get(event.request_id)
            self.counters.bump(self.counters.preemptions, (known.sandbox if known else event.sandbox) or "")
        if event.request_id not in self.requests and event.kind is not EventKind.FINISHED \
                and len(self.requests) >= self.max_requests:
            raise ProtocolError(f"more than {self.max_requests} live requests on one engine link (max_requests); "
                                "report finished for requests that are done")
        before = self.requests.get(event.request_id)
        was_daemon_paused = before is not None and before.paused_by_daemon and before.state is State.PAUSED
        r = es.apply_event(self.requests, event, now_s)
        self.counters.bump(self.counters.events, (event.kind.value, "engine"))
        if was_daemon_paused and event.kind is EventKind.PAUSED:
            return []                       # the daemon paused it already and asked the policy then
        self._observe(_at(event, now_s, sandbox=r.sandbox if r else event.sandbox))
        if r is None:
            return []
        if event.kind is EventKind.PAUSED:
            calls = self.calls_of(r.sandbox) if self.calls_of is not None and r.sandbox else []
            if calls and r.tool_call_id is None:     # the agent's tool call is running already
                self._link(r, *calls[-1])
            return self._decide(Trigger.PAUSE, now_s, subject=r.request_id)
        if event.kind in (EventKind.RESUMED, EventKind.PREEMPTED):
            return self._pressure(r, now_s)
        return []

    # ---- the daemon's hooks ---------------------------------------------------------
    def tool_call_began(self, sandbox: str, tool: str, call_id: str, now_s: float) -> list[Directive]:
        """Sandbox `sandbox` began tool call `call_id`: its requests wait for it."""
        out: list[Directive] = []
        for r in [r for r in self.requests.values() if r.sandbox == sandbox]:
            if r.state is State.PAUSED:
                if r.tool_call_id is None:   # paused by the engine: the call's end means "exited"
                    self._link(r, call_id, None)
                continue
            es.pause(r, tool, call_id, now_s)
            self._link_call(call_id)
            self.counters.bump(self.counters.events, (EventKind.PAUSED.value, "daemon"))
            self._observe(RequestEvent(r.request_id, r.session_id, EventKind.PAUSED, now_s, r.context_tokens,
                                       sandbox=sandbox, tool=tool, tool_call_id=call_id))
            out += self._decide(Trigger.PAUSE, now_s, subject=r.request_id)
        return out

    def _link(self, r: es.EngineRequest, call_id: str, signal: ToolSignal | None) -> None:
        r.tool_call_id = call_id
        self._link_call(call_id)
        if signal is not None:
            self._signal(r, signal)

    def tool_call_ended(self, call_id: str, now_s: float) -> list[Directive]:
        """Tool call `call_id` returned: the requests waiting for it want their KV back."""
        waiting = [r for r in self.requests.values() if r.tool_call_id == call_id and r.state is State.PAUSED]
        if not waiting:
            return []
        for r in waiting:
            self._signal(r, ToolSignal.EXITED)
        out = self._decide(Trigger.TICK, now_s)
        for r in waiting:
            r.tool_call_id = None
            if r.paused_by_daemon:
                es.resume(r, now_s)
                self.counters.bump(self.counters.events, (EventKind.RESUMED.value, "daemon"))
                self._observe(RequestEvent(r.request_id, r.session_id, EventKind.RESUMED, now_s, r.context_tokens,
                                           sandbox=r.sandbox))
                out += self._pressure(r, now_s)
        return out

    def tool_signal(self, call_id: str, signal: ToolSignal, now_s: float) -> list[Directive]:
        """A sandbox policy froze, throttled, thawed or relaxed tool call `call_id`: the
        requests waiting for it learn it, and a longer wait is decided on again."""
        out: list[Directive] = []
        for r in self.requests.values():
            if r.tool_call_id == call_id and r.state is State.PAUSED:
                self._signal(r, signal)
                if signal in (ToolSignal.FROZEN, ToolSignal.THROTTLED):
                    out += self._decide(Trigger.PAUSE, now_s, subject=r.request_id)
        return out

    def learn(self, record: ToolCallRecord) -> None:
        """A finished tool call's duration, for calls no request here waited for (those
        the policy learns from their pause and resume)."""
        if record.call_id in self.linked_calls:
            del self.linked_calls[record.call_id]
            return
        if record.duration_s is None or record.duration_s < 0:
            return
        self._learn(record.sandbox, tool_key(record.tool, record.command), record.call_id,
                    record.start_monotonic_s, record.start_monotonic_s + record.duration_s)

    def learn_history(self, records: Iterable[dict[str, Any]]) -> int:
        """Seed the predictor with earlier tool-call records (the daemon's records file)."""
        n = 0
        for rec in records:
            try:
                duration, start = float(rec["duration_s"]), float(rec.get("start_monotonic_s") or 0.0)
                sandbox, tool, call_id = str(rec["sandbox"]), str(rec["tool"]), str(rec["call_id"])
            except (KeyError, TypeError, ValueError):
                continue
            if not math.isfinite(duration) or duration < 0:
                continue
            self._learn(sandbox, tool_key(tool, rec.get("command") if isinstance(rec.get("command"), str) else None),
                        call_id, start, start + duration)
            n += 1
        return n

    def _learn(self, sandbox: str, tool: str, call_id: str, start_s: float, end_s: float) -> None:
        # The policy's public input is RequestEvents: a pause and a resume of a request
        # that exists only for this, so any policy that learns durations learns this one.
        rid = f"toolcall:{call_id}"
        self._observe(RequestEvent(rid, rid, EventKind.PAUSED, start_s, 0, sandbox=sandbox, tool=tool))
        self._observe(RequestEvent(rid, rid, EventKind.RESUMED, end_s, 0, sandbox=sandbox))

    def wake(self, now_s: float) -> list[Directive]:
        """The policy's wake-up (TICK), when due."""
        if self.registration is None or self.wake_at_s is None or now_s < self.wake_at_s:
            return []
        self.wake_at_s = None
        return self._decide(Trigger.TICK, now_s)

    def host_pressure(self, now_s: float, share_bytes: int | None) -> list[Directive]:
        """HOST_PRESSURE when the host KV pool is over its share of the host memory budget
        (`share_bytes`; None: no budget, or a policy that does not share host memory)."""
        self.host_share_bytes = share_bytes if self.shares_host_memory else None
        if self.registration is None or self.host_share_bytes is None:
            return []
        used, _ = es.host_bytes(self.registration, self.requests.values())
        if used <= self.host_share_bytes:
            return []
        return self._decide(Trigger.HOST_PRESSURE, now_s, need_bytes=used - self.host_share_bytes)

    # ---- the policy -----------------------------------------------------------------
    def _decide(self, trigger: Trigger, now_s: float, subject: str | None = None, need_tokens: int = 0,
                need_bytes: int = 0) -> list[Directive]:
        if self.registration is None:
            return []
        snap = es.build_snapshot(self.registration, self.requests.values(), now_s, trigger, subject,
                                 need_tokens, need_bytes, self.host_share_bytes)
        self.counters.bump(self.counters.decisions, trigger.value)
        errors, fallbacks = self.decider.errors, self.decider.fallbacks
        decision = self.decider.decide(snap)        # never raises; vllm-v1 decides for a failing policy
        if self.decider.errors > errors:
            log.error("KV policy %s failed on %s (%s); vllm-v1 decides instead", self.policy_name, trigger.value,
                      self.decider.last_error)
            self._failed()
        if self.decider.fallbacks > fallbacks:
            self.counters.bump(self.counters.fallbacks, self.policy_label)
        wake = decision.wake_at_s                   # clamped by the harness
        if wake is not None:
            self.wake_at_s = wake if self.wake_at_s is None else min(self.wake_at_s, wake)
        directives = list(decision.directives[:MAX_DIRECTIVES_PER_DECISION])
        for d in directives:
            self.counters.bump(self.counters.directives, d.action.value)
        self.sent += len(directives)
        return directives

    def _pressure(self, r: es.EngineRequest, now_s: float) -> list[Directive]:
        assert self.registration is not None
        need = es.shortfall_tokens(self.registration, self.requests.values(), r)
        if need <= 0:
            return []
        return self._decide(Trigger.PRESSURE, now_s, subject=r.request_id, need_tokens=need)

    def _observe(self, event: RequestEvent) -> None:
        errors = self.decider.errors
        self.decider.observe(event)
        if self.decider.errors > errors:
            log.error("KV policy %s failed to observe %s (%s)", self.policy_name, event.kind.value,
                      self.decider.last_error)
            self._failed()

    def _signal(self, r: es.EngineRequest, signal: ToolSignal) -> None:
        accept = getattr(self.policy, "signal", None)   # only agentcg takes live tool signals
        if accept is None:
            return
        try:
            accept(r.request_id, signal)
        except Exception:
            log.exception("KV policy %s failed on signal %s", self.policy_name, signal.value)
            self._failed()

    def _failed(self) -> None:
        self.failures += 1
        self.counters.bump(self.counters.policy_failures, self.policy_label)

    def _link_call(self, call_id: str) -> None:
        self.linked_calls[call_id] = None
        while len(self.linked_calls) > MAX_LINKED_CALLS:
            del self.linked_calls[next(iter(self.linked_calls))]

    def summary(self) -> dict[str, Any]:
        reg = self.registration
        states: dict[str, int] = {}
        for r in self.requests.values():
            states[r.state.value] = states.get(r.state.value, 0) + 1
        by_sandbox = self.tokens_by_sandbox()
        tokens = {tier: sum(t[tier] for t in by_sandbox.values()) for tier in TIERS}
        return {"link_id": self.link_id, "engine_id": reg.engine_id if reg else None,
                "model": reg.model if reg else None, "kv_policy": self.policy_name,
                "requests": states, "kv_tokens": tokens, "directives_sent": self.sent,
                "directives_refused": self.refused, "policy_failures": self.failures, "wake_at_s": self.wake_at_s,
                "kv_tokens_by_sandbox": by_sandbox,
                "engine_stats": dataclasses.asdict(self.stats) if self.stats is not None else None}

    def tokens_by_sandbox(self) -> dict[str, dict[str, int]]:
        """KV tokens per sandbox ("" = none) and tier, as the engine reported them."""
        out: dict[str, dict[str, int]] = {}
        for r in self.requests.values():
            t = out.setdefault(r.sandbox or "", dict.fromkeys(TIERS, 0))
            t["gpu"] += r.gpu_tokens
            t["host"] += r.host_tokens
            t["ssd"] += r.ssd_tokens
        return out


def _at(event: RequestEvent, now_s: float, sandbox: str | None) -> RequestEvent:
    """The event on the daemon's clock (and with the sandbox the daemon knows)."""
    return RequestEvent(event.request_id, event.session_id, event.kind, now_s, event.context_tokens,
                        sandbox=sandbox, tool=event.tool, tool_call_id=event.tool_call_id,
                        cached_tokens=event.cached_tokens)

