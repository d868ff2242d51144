"""Start-up adoption: take over what an earlier daemon left (its state file, and the
cgroup tree for what the file does not know), so a `kill -9` or an upgrade loses no
running tool call. Calls owned by a live local `agentcg run` are left alone; calls
whose cgroup vanished while no daemon ran are recorded as lost. A corrupt state is moved
aside and the tree adopted alone: its calls as tool "unknown", recorded once their
processes are gone (the daemon watches them), never killed for it.
"""
from __future__ import annotations

import logging
import time
from typing import Callable

from agentcg.controller.cgroup import CgroupTree
from agentcg.controller.daemon.calls import DaemonCalls
from agentcg.controller.daemon.config import DaemonConfig
from agentcg.controller.daemon.metrics import DaemonStats
from agentcg.controller.daemon.removals import clear_done
from agentcg.controller.daemon.state import (
    Adoption, CallEntry, DaemonState, SandboxEntry, load_state, move_aside, plan_adoption,
)
from agentcg.controller.reaper import reap_orphans
from agentcg.controller.sandbox import ensure_sandbox, sandbox_lock
from agentcg.errors import AgentcgError, CgroupGone, InvalidInput
from agentcg.records import ToolCallRecord

log = logging.getLogger("agentcg.daemon")


def adopt(cfg: DaemonConfig, tree: CgroupTree, calls: DaemonCalls, state: DaemonState, stats: DaemonStats,
          apply_sandbox_limits: Callable[[SandboxEntry, set[str]], None],
          spare: tuple[int, int] | None = None) -> Adoption:
    """Fill `state` and `calls` from the earlier daemon's state file and the tree. `spare`:
    the (pid, start ticks) of the daemon before us, whose calls are ours to adopt, not to reap."""
    try:
        saved = load_state(cfg.state_path)
    except InvalidInput as exc:
        aside = move_aside(cfg.state_path, f".corrupt-{int(time.time())}")
        log.error("%s; moved it to %s and adopt from the cgroup tree alone (its calls as tool "
                  "\"unknown\", recorded when their processes are gone)", exc, ", ".join(map(str, aside)))
        saved = DaemonState()
    plan = plan_adoption(tree, saved, time.monotonic(), time.time(), cfg.limits.grace_s)
    done = clear_done(tree, cfg.daemon.state_dir, plan, saved)    # finished, not yet removed (removals.py)
    if done:
        log.info("removed %d finished tool-call cgroup(s) an earlier daemon left for removal", done)
    foreign = _live_foreign_owners(cfg, saved)
    for entry in plan.sandboxes:
        state.sandboxes[entry.name] = entry
    for entry in plan.recreate:
        try:
            with sandbox_lock(tree, entry.name, cfg.daemon.state_dir):
                ensure_sandbox(tree, entry.name)
                apply_sandbox_limits(entry, entry.set_fields())
            state.sandboxes[entry.name] = entry
        except AgentcgError as exc:
            log.error("cannot recreate sandbox %s: %s", entry.name, exc)
    for entry in [c for c in plan.calls if c.call_id in saved.calls]:
        _adopt_call(calls, state, stats, entry)
    reaped = reap_orphans(tree, cfg.daemon.state_dir, spare=spare)   # dead `agentcg run`s, not ours
    for _ in reaped:
        stats.observe_action("reap", "owner_dead")
    for entry in plan.calls:
        if entry.call_id in saved.calls or entry.call_id in foreign or any(r.call_id == entry.call_id for r in reaped):
            continue
        if tree.exists(f"{entry.sandbox}/tools/{entry.call_id}"):
            _adopt_call(calls, state, stats, entry)
    for entry in plan.lost:
        record_lost(calls, state, stats, entry)
    return plan


def _live_foreign_owners(cfg: DaemonConfig, saved: DaemonState) -> set[str]:
    """Call ids with an owner file of a live process other than a daemon's: a local
    `agentcg run` owns them, and the daemon leaves them alone."""
    from agentcg.controller.reaper import is_alive, list_owners

    return {owner.call_id for _, owner in list_owners(cfg.daemon.state_dir)
            if owner is not None and owner.call_id not in saved.calls and is_alive(owner)}


def _adopt_call(calls: DaemonCalls, state: DaemonState, stats: DaemonStats, entry: CallEntry) -> None:
    try:
        calls.adopt_entry(entry)
    except CgroupGone:
        record_lost(calls, state, stats, entry)
        return
    state.calls[entry.call_id] = entry   # owner_pid 0 (tree only): the daemon records it once empty
    stats.observe_action("adopt", "restart")


def record_lost(calls: DaemonCalls, state: DaemonState, stats: DaemonStats, entry: CallEntry) -> None:
    record = ToolCallRecord(
        sandbox=entry.sandbox, call_id=entry.call_id, tool=entry.tool, command=entry.command,
        start_monotonic_s=entry.start_monotonic_s, start_wall_s=entry.start_wall_s,
        end_monotonic_s=time.monotonic(), end_wall_s=time.time(), exit_code=entry.exit_code,
        signal=entry.signal, priority=entry.priority, mem_hint_bytes=entry.mem_hint_bytes,
        message="the call's cgroup vanished while the daemon was down; nothing was measured",
        extra={"lost": True})
    calls._append(record)
    stats.observe_call(record)
    stats.observe_action("lost", "cgroup_vanished")
    state.calls.pop(entry.call_id, None)
