"""The one place a sandbox-policy Snapshot is built from cgroup readings: the daemon,
`agentcg replay` and local tool calls all decide on what this returns.

The caller says what exists (sandboxes and calls with their cgroup paths, the host scope
and its budget) and what the core remembers about them (frozen, throttle level, pending
calls, events); this reads memory.current (and memory.peak, PSI where the host has them)
once per cgroup. A cgroup that vanished between listing and reading is left out, or read
as 0 where the caller keeps it (`missing_as_zero`, replay: a call that just exited).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, TypeVar

from agentcg.controller.cgroup import CgroupTree
from agentcg.errors import AgentcgError
from agentcg.policies.sandbox import CallView, Event, PendingCall, SandboxView, Snapshot

Key = tuple[str, str]            # (sandbox, call_id)
T = TypeVar("T")


@dataclass(frozen=True)
class SandboxInput:
    name: str
    path: str                    # below the tree's root
    priority: str = "normal"
    budget_bytes: int | None = None


@dataclass(frozen=True)
class CallInput:
    sandbox: str
    call_id: str
    tool: str
    path: str
    started_s: float             # on the caller's clock (the same as `now`)
    hint_bytes: int | None = None


@dataclass(frozen=True)
class PendingInput:
    sandbox: str
    call_id: str
    tool: str
    hint_bytes: int | None
    since_s: float


@dataclass(frozen=True)
class Inputs:
    sandboxes: tuple[SandboxInput, ...]
    calls: tuple[CallInput, ...] = ()
    host_path: str | None = ""   # the scope whose usage counts against the host budget; None: sum
    host_budget_bytes: int | None = None
    missing_as_zero: bool = False
    read_psi: bool = True


@dataclass(frozen=True)
class Readings:
    """What one snapshot read, for callers that keep samples (replay's peaks and means)."""

    host_bytes: int
    sandbox_bytes: dict[str, int]
    call_bytes: dict[Key, int]


def build_snapshot(tree: CgroupTree, inputs: Inputs, now: float, *, time_s: float | None = None,
                   frozen: frozenset[Key] | set[Key] = frozenset(), throttle: Mapping[Key, int] | None = None,
                   pending: tuple[PendingInput, ...] = (), events: tuple[Event, ...] = (),
                   peaks: dict[Key, int] | None = None, floors: Mapping[Key, int] | None = None,
                   ) -> tuple[Snapshot, Readings]:
    """The snapshot at `now` (its time is `time_s`, default `now`). `peaks` is updated with
    each call's usage, so a peak between two memory.peak-less readings is not lost.
    `floors`: usage the kernel just reported for a call (the RSS in an eBPF threshold
    event); memory.current lags it by the memcg's per-CPU charge batches, so a call, its
    sandbox and the host read at least that much."""
    throttle = throttle or {}
    peaks = peaks if peaks is not None else {}
    caps = tree.capabilities
    zero = 0 if inputs.missing_as_zero else None
    floors = floors or {}
    by_sandbox: dict[str, list[CallView]] = {}
    call_bytes: dict[Key, int] = {}
    extra: dict[str, int] = {}
    for call in inputs.calls:
        usage = _read(lambda: tree.memory_current(call.path), zero)
        if usage is None:
            continue
        key = (call.sandbox, call.call_id)
        if floors.get(key, 0) > usage:
            extra[call.sandbox] = extra.get(call.sandbox, 0) + floors[key] - usage
            usage = floors[key]
        peak = _read(lambda: tree.memory_peak(call.path), None) if "memory.peak" in caps else None
        peaks[key] = max(peaks.get(key, 0), usage, peak or 0)
        call_bytes[key] = usage
        by_sandbox.setdefault(call.sandbox, []).append(
            CallView(call.call_id, call.tool, usage, peaks[key], max(0.0, now - call.started_s), call.hint_bytes,
                     key in frozen, throttle.get(key, 0)))
    waiting: dict[str, list[PendingCall]] = {}
    for p in pending:
        waiting.setdefault(p.sandbox, []).append(PendingCall(p.call_id, p.tool, p.hint_bytes, max(0.0, now - p.since_s)))
    views, sandbox_bytes = [], {}
    for sb in inputs.sandboxes:
        usage = _read(lambda: tree.memory_current(sb.path), zero)
        if usage is None:
            continue
        usage += extra.get(sb.name, 0)
        sandbox_bytes[sb.name] = usage
        pressure = (_read(lambda: tree.pressure(sb.path, "memory"), None)
                    if inputs.read_psi and "psi" in caps else None)
        views.append(SandboxView(sb.name, sb.priority, usage, sb.budget_bytes,
                                 pressure.some.avg10 if pressure else 0.0, tuple(by_sandbox.get(sb.name, ())),
                                 tuple(waiting.get(sb.name, ()))))
    host = None
    if inputs.host_path is not None:
        host = _read(lambda: tree.memory_current(inputs.host_path), zero)
        if host is not None:
            host += sum(extra.values())
    if host is None:
        host = sum(sandbox_bytes.values())
    snapshot = Snapshot(now if time_s is None else time_s, host, inputs.host_budget_bytes, tuple(views), events)
    return snapshot, Readings(host, sandbox_bytes, call_bytes)


def _read(fn: Callable[[], T], missing: T | None) -> T | None:
    """A cgroup reading, or `missing` when the cgroup went away or the host lacks the file."""
    try:
        return fn()
    except AgentcgError:
        return missing
