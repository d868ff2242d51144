"""The one place a sandbox-policy Snapshot is built from cgroup readings: the daemon,
`agentcg replay` and local tool calls all decide on what this returns.

The caller says what exists (sandboxes and calls with their cgroup paths, the host scope
and its budget) and what the core remembers about them (frozen, throttle level, pending
calls, events); this reads memory.current (and memory.peak, PSI where the host has them)
once per cgroup. A cgroup that vanished between listing and reading is left out, or read
as 0 where the caller keeps it (`missing_as_zero`, replay: a call that just exited).
"""
from __future__ import annotations

from collections import ChainMap
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping, TypeVar

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
    # the daemon at scale: a sandbox's calls are read only while it (or the host) is at or
    # above this share of its budget, or has a frozen, throttled or kernel-reported call;
    # elsewhere no policy acts and a call's last reading stands (`cache`). None: read all.
    near_budget: float | None = None
    # the calls per sandbox, in place of `calls`, for a caller that keeps them between
    # steps (the daemon): a group passed again as the same tuple is known to be unchanged,
    # and a cold sandbox's views are then taken from the last step (`Views`)
    call_groups: Mapping[str, tuple[CallInput, ...]] | None = None


@dataclass(frozen=True)
class Readings:
    """What one snapshot read, for callers that keep samples (replay's peaks and means)."""

    host_bytes: int
    sandbox_bytes: dict[str, int]
    call_bytes: Mapping[Key, int]


@dataclass
class _Group:
    calls: tuple[CallInput, ...]          # the group they were built from (compared by identity)
    views: list[CallView]
    call_bytes: dict[Key, int]


@dataclass
class Views:
    """What an incremental build keeps between steps (Inputs.call_groups): per cold
    sandbox, the call views its last step built, and per call of a cold sandbox its view.
    A group passed again as the same tuple takes its views again; a changed group builds
    views only for the CallInputs it did not have (a new call, or one whose tool or start
    changed: a new CallInput). While a sandbox is cold its calls' readings are the cached
    ones anyway (Inputs.near_budget); a reused view's age_s is as of the step that built
    it (no policy reads it). A hot sandbox's views are built afresh every step."""

    groups: dict[str, _Group] = field(default_factory=dict)
    calls: dict[Key, tuple[CallInput, CallView, int]] = field(default_factory=dict)   # per cold call
    reused: int = 0                        # groups taken again, over all steps (tests, metrics)
    built: int = 0


def build_snapshot(tree: CgroupTree, inputs: Inputs, now: float, *, time_s: float | None = None,
                   frozen: frozenset[Key] | set[Key] = frozenset(), throttle: Mapping[Key, int] | None = None,
                   pending: tuple[PendingInput, ...] = (), events: tuple[Event, ...] = (),
                   peaks: dict[Key, int] | None = None, floors: Mapping[Key, int] | None = None,
                   cache: dict[Key, tuple[int, int | None]] | None = None, views: Views | None = None,
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
    extra: dict[str, int] = {}
    hot: set[str] | None = None
    early: dict[str, int | None] = {}
    if cache is not None:
        # which sandboxes' calls to read (Inputs.near_budget); the cold ones keep this reading,
        # the hot ones are read again after their calls (calls first, as without a cache)
        early = {sb.name: _read(lambda: tree.memory_current(sb.path), zero) for sb in inputs.sandboxes}
        early_host = _read(lambda: tree.memory_current(inputs.host_path), zero) if inputs.host_path is not None else None
        hot = _hot_sandboxes(inputs, early, early_host, frozen, throttle, floors)
    groups = inputs.call_groups if inputs.call_groups is not None else _grouped(inputs.calls)
    parts: list[dict[Key, int]] = []
    for name, group in groups.items():
        cold = hot is not None and name not in hot
        kept = views.groups.get(name) if views is not None else None
        if cold and kept is not None and kept.calls is group:
            views.reused += 1                  # type: ignore[union-attr]
            built, part = kept.views, kept.call_bytes
        else:
            built, part = [], {}
            known = views.calls if views is not None and cold else None
            for call in group:
                key = (call.sandbox, call.call_id)
                hit = known.get(key) if known is not None else None
                if hit is not None and hit[0] is call:     # a cold call as last built: its view stands
                    part[key] = hit[2]
                    built.append(hit[1])
                    continue
                cached = cache.get(key) if cache is not None and cold else None
                if cached is not None:
                    usage, peak = cached
                else:
                    usage = _read(lambda: tree.memory_current(call.path), zero)
                    if usage is None:
                        continue
                    peak = _read(lambda: tree.memory_peak(call.path), None) if "memory.peak" in caps else None
                    if cache is not None:
                        cache[key] = (usage, peak)
                if floors.get(key, 0) > usage:
                    extra[call.sandbox] = extra.get(call.sandbox, 0) + floors[key] - usage
                    usage = floors[key]
                peaks[key] = max(peaks.get(key, 0), usage, peak or 0)
                part[key] = usage
                view = CallView(call.call_id, call.tool, usage, peaks[key], max(0.0, now - call.started_s),
                                call.hint_bytes, key in frozen, throttle.get(key, 0))
                built.append(view)
                if known is not None:
                    known[key] = (call, view, usage)
            if views is not None:
                views.built += 1
                _forget_gone(views, kept, part, keep=cold)
                if cold:     # a hot sandbox's views hold readings and flags that change each step
                    views.groups[name] = _Group(group, built, part)
                else:
                    views.groups.pop(name, None)
        parts.append(part)
        if built:
            by_sandbox.setdefault(name, []).extend(built)
    if views is not None:
        for name in [n for n in views.groups if n not in groups]:
            _forget_gone(views, views.groups.pop(name), {}, keep=False)
    waiting: dict[str, list[PendingCall]] = {}
    for p in pending:
        waiting.setdefault(p.sandbox, []).append(PendingCall(p.call_id, p.tool, p.hint_bytes, max(0.0, now - p.since_s)))
    views, sandbox_bytes = [], {}
    for sb in inputs.sandboxes:
        if hot is not None and sb.name not in hot:
            usage = early.get(sb.name)
        else:
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
    call_bytes: Mapping[Key, int] = parts[0] if len(parts) == 1 else ChainMap(*parts) if parts else {}
    return snapshot, Readings(host, sandbox_bytes, call_bytes)


def _forget_gone(views: Views, kept: _Group | None, part: Mapping[Key, int], keep: bool) -> None:
    """Drop the per-call views of a group's calls that left it (all of them unless `keep`)."""
    if kept is not None:
        for key in (kept.call_bytes.keys() - part.keys()) if keep else kept.call_bytes.keys():
            views.calls.pop(key, None)
    if not keep:
        for key in part:
            views.calls.pop(key, None)


def _grouped(calls: Iterable[CallInput]) -> dict[str, tuple[CallInput, ...]]:
    out: dict[str, list[CallInput]] = {}
    for call in calls:
        out.setdefault(call.sandbox, []).append(call)
    return {name: tuple(group) for name, group in out.items()}


def _hot_sandboxes(inputs: Inputs, raw_sandbox: Mapping[str, int | None], raw_host: int | None,
                   frozen: frozenset[Key] | set[Key], throttle: Mapping[Key, int], floors: Mapping[Key, int]) -> set[str]:
    """The sandboxes whose calls must be read this time (see Inputs.near_budget)."""
    near = inputs.near_budget
    if near is None or (inputs.host_budget_bytes is not None and raw_host is not None
                        and raw_host >= near * inputs.host_budget_bytes):
        return {sb.name for sb in inputs.sandboxes}
    hot = {sb.name for sb in inputs.sandboxes if sb.budget_bytes is not None
           and (raw_sandbox.get(sb.name) or 0) >= near * sb.budget_bytes}
    hot.update(key[0] for key in frozen)
    hot.update(key[0] for key, level in throttle.items() if level)
    hot.update(key[0] for key in floors)
    return hot


def _read(fn: Callable[[], T], missing: T | None) -> T | None:
    """A cgroup reading, or `missing` when the cgroup went away or the host lacks the file."""
    try:
        return fn()
    except AgentcgError:
        return missing
