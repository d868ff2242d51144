"""The lifecycle of one tool call: its cgroup, its processes, its record.

    mgr = ToolCallManager(tree, monitor=BpfMonitor() or None, records_path=Path(...))
    call = mgr.begin("sb1", "pytest", ["pytest", "-x"])      # <root>/sb1/tools/<call-id>
    proc = call.spawn(["pytest", "-x"])                        # joins the cgroup before exec
    record = mgr.end(call, exit_code=proc.wait())              # grace, kill, read, remove

`end` = `returned` + waiting for `finish_due`: background children of the call stay
accounted to it until they exit, or until `grace_s` after the call returned, when the
cgroup is killed. The record is read after the last process is gone, so it covers them.
Callers with an event loop (the daemon, `sandbox exec`) call `returned` and then
`finish_due()` every turn instead of blocking in `end`.

Each call keeps an owner file (see `reaper`) so a killed owner's cgroup is reaped later.
Without a BpfMonitor the eBPF fields of the record stay None (not measured), never 0.
With a `control` (controller/core/local.py: the daemon's and replay's control core), a
call with a memory hint (or a learned peak) waits in `begin` until the policy admits it,
and every finished call teaches the policy its peak.
"""
from __future__ import annotations

import json
import logging
import os
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from agentcg.controller.cgroup import CgroupTree
from agentcg.controller.cgroup.parked import Parked, supports as parked_supports
from agentcg.controller.cgroup.spawner import helper_path, spawn_with_fds
from agentcg.controller.reaper import CallOwner, process_start_ticks, remove_owner, write_owner
from agentcg.controller.sandbox import (
    auto_created,
    call_path, clear_auto_created, ensure_sandbox, tools_path, mark_auto_created, parse_priority, procs_files,
    remove_auto_sandbox_if_unused, remove_sandbox_if_unused, sandbox_lock, set_priority, state_dir, validate_name,
)
from agentcg.errors import AgentcgError, CgroupError, CgroupGone, InvalidInput
from agentcg.controller.toolcall_pool import CallPool, Removal, Spare, new_call_id
from agentcg.controller.toolcall_record import append_record, read_record
from agentcg.records import ToolCallRecord, truncate_command

log = logging.getLogger("agentcg.toolcall")

if TYPE_CHECKING:
    from agentcg.bpf.monitor import BpfMonitor

DEFAULT_GRACE_S = 5.0
MAX_RUNNING_CALLS = 4096          # = the monitor's MAX_CGROUPS: one watched cgroup per call
MAX_TOOL_CHARS = 64
_FINISH_POLL_S = (0.0005, 0.02)   # first and largest sleep while `end` waits for the cgroup to empty


@dataclass
class ToolCall:
    """A running tool call. `path` is relative to the tree's root."""

    call_id: str
    sandbox: str
    tool: str
    command: str
    path: str
    cgroup_id: int
    procs_files: list[Path]
    priority: str
    mem_hint_bytes: int | None
    start_monotonic_s: float
    start_wall_s: float
    created_sandbox: bool
    _tree: CgroupTree = field(repr=False)
    returned_monotonic_s: float | None = None
    returned_wall_s: float | None = None
    exit_code: int | None = None
    signal: int | None = None
    grace_s: float = DEFAULT_GRACE_S
    measured: bool = True        # False: its process never ran inside the cgroup (exited first)
    extra: dict[str, float] = field(default_factory=dict)   # copied into the record's `extra`
    policy_action: str | None = None   # what a policy last did to the call (see note())
    policy_message: str | None = None  # what the agent is told about it
    join_fds: list[int] = field(default_factory=list, repr=False)   # a spare's open cgroup.procs fds
    parked: "Parked | None" = field(default=None, repr=False)        # a spare's helper, joined already

    def spawn(self, argv: Sequence[str], **popen_kwargs: Any) -> subprocess.Popen:
        """Start argv in the call's cgroup (it joins before exec: it never runs outside).
        A spare's parked helper execs it (no fork, no migration: cgroup/parked.py)."""
        parked, self.parked = self.parked, None
        if parked is not None:
            if parked_supports(popen_kwargs) and parked.alive():
                try:
                    return parked.spawn(argv, **popen_kwargs)
                except BaseException:
                    parked.release()
                    raise
            parked.release()   # it must not keep the cgroup populated
        if self.join_fds and popen_kwargs.get("preexec_fn") is None and popen_kwargs.get("executable") is None \
                and helper_path() is not None:
            popen_kwargs.pop("preexec_fn", None)
            popen_kwargs.pop("executable", None)
            if isinstance(argv, (str, bytes)) or not argv:
                raise InvalidInput(f"spawn: argv must be a non-empty list such as ['/bin/true'], got {argv!r}")
            try:   # the fds were opened when the spare was made: no open(2) per hierarchy here
                return spawn_with_fds(self.join_fds, argv, **popen_kwargs)
            except CgroupGone:
                raise CgroupGone(f"{self.path}: the cgroup vanished while spawning {argv[0]!r}") from None
        return self._tree.spawn(self.path, argv, **popen_kwargs)

    def attach(self, pid: int) -> None:
        """Move a running process (all its threads) into the call's cgroup."""
        self.release_parked()
        self._tree.attach(self.path, pid)

    def release_parked(self) -> None:
        parked, self.parked = self.parked, None
        if parked is not None:
            parked.release()

    @property
    def has_returned(self) -> bool:
        return self.returned_monotonic_s is not None


class ToolCallManager:
    """Begins and ends tool calls below one CgroupTree; thread-safe."""

    records_mode = 0o600              # the records file's mode ([daemon] records_mode)
    records_gid: int | None = None    # and group (the socket group, with records_mode 0640)

    def __init__(self, tree: CgroupTree, monitor: "BpfMonitor | None" = None, records_path: Path | None = None,
                 grace_s: float = DEFAULT_GRACE_S, state: Path | None = None,
                 control: Any = None, pool_size: int = 0) -> None:
        """`control`: a controller.core.local.LocalControl (not imported here: the core
        imports this module's types, not the other way round), or None. `pool_size` > 0:
        keep that many spare cgroups per sandbox and remove finished calls' cgroups in a
        background thread (toolcall_pool.py), so neither is on a call's critical path."""
        _check_grace(grace_s)
        self.tree = tree
        self.monitor = monitor
        self.records_path = Path(records_path) if records_path is not None else None
        self.grace_s = grace_s
        self.state = state_dir(state)
        self._calls: dict[str, ToolCall] = {}
        self._lock = threading.Lock()
        self._owner_ticks = process_start_ticks(os.getpid()) or 0
        self._owner_dir: str | None = None            # <state>/calls, checked once (_new_owner)
        self._tools_dirs: dict[str, list[str]] = {}   # sandbox -> its tools dir per hierarchy
        self.control = control
        if control is not None:
            control.bind(self)
        self.pool: CallPool | None = CallPool(self, pool_size) if pool_size > 0 else None

    # ---- sandboxes --------------------------------------------------------------
    def ensure_sandbox(self, name: str, priority: str | None = None) -> bool:
        """Create the sandbox if missing; an explicitly made sandbox outlives its calls."""
        self.forget_dirs(name)
        with sandbox_lock(self.tree, name, self.state):
            clear_auto_created(self.tree, name, self.state)
            return ensure_sandbox(self.tree, name, priority)

    def remove_sandbox_if_unused(self, name: str) -> bool:
        self.forget_dirs(name)
        with sandbox_lock(self.tree, name, self.state):
            return remove_sandbox_if_unused(self.tree, name)

    # ---- calls ------------------------------------------------------------------
    def begin(self, sandbox: str, tool: str | None, command: Sequence[str] | str, *,
              mem_hint_bytes: int | None = None, priority: str = "normal",
              grace_s: float | None = None, create_sandbox: bool = True, call_id: str | None = None) -> ToolCall:
        """Create the call's cgroup (and the sandbox when missing and `create_sandbox`),
        watch it in eBPF and write its owner file. The caller then spawns or attaches."""
        validate_name(sandbox)
        parse_priority(priority)
        if mem_hint_bytes is not None and (isinstance(mem_hint_bytes, bool) or not isinstance(mem_hint_bytes, int)
                                           or mem_hint_bytes <= 0):
            raise InvalidInput(f"mem_hint_bytes must be a positive number of bytes, got {mem_hint_bytes!r}")
        grace_s = self.grace_s if grace_s is None else _check_grace(grace_s)
        tool = tool_name(tool, command)
        with self._lock:
            if len(self._calls) >= MAX_RUNNING_CALLS:
                raise CgroupError(f"{MAX_RUNNING_CALLS} tool calls are running already; end some first")
        spare = self.pool.take(sandbox) if self.pool is not None and call_id is None else None
        if spare is not None:
            return self._begin_spare(spare, tool, command, mem_hint_bytes, priority, grace_s)
        call_id = validate_name(call_id, "call id") if call_id is not None else new_call_id()
        path = call_path(sandbox, call_id)
        with sandbox_lock(self.tree, sandbox, self.state):
            if not create_sandbox and not self.tree.exists(sandbox):
                raise CgroupGone(f"no sandbox {sandbox!r}; create it first (`agentcg sandbox create {sandbox}`)")
            created = False if self.tree.exists(tools_path(sandbox)) else ensure_sandbox(self.tree, sandbox)
            if created:
                self.forget_dirs(sandbox)
                mark_auto_created(self.tree, sandbox, self.state)
            self.tree.create(path)
        start_mono, start_wall = time.monotonic(), time.time()
        try:
            self._new_owner(CallOwner(call_id, sandbox, self.tree.root, os.getpid(), self._owner_ticks,
                                      start_wall, created))
            if priority != "normal":
                set_priority(self.tree, path, priority)
            cgroup_id = self.tree.cgroup_id(path)
            if self.monitor is not None:
                self.monitor.watch(cgroup_id)
        except BaseException:
            self._discard(sandbox, call_id, path, created)
            raise
        call = ToolCall(call_id=call_id, sandbox=sandbox, tool=tool, command=truncate_command(list(command)
                        if not isinstance(command, str) else command), path=path, cgroup_id=cgroup_id,
                        procs_files=self._procs_files(sandbox, call_id), priority=priority, mem_hint_bytes=mem_hint_bytes,
                        start_monotonic_s=start_mono, start_wall_s=start_wall, created_sandbox=created,
                        _tree=self.tree, grace_s=grace_s)
        return self._started(call)

    def _begin_spare(self, spare: "Spare", tool: str, command: Sequence[str] | str, mem_hint_bytes: int | None,
                     priority: str, grace_s: float) -> ToolCall:
        """begin on a spare cgroup: made, owned (its owner file names us) and watched-to-be."""
        start_mono, start_wall = time.monotonic(), time.time()
        call = ToolCall(call_id=spare.call_id, sandbox=spare.sandbox, tool=tool, command=truncate_command(
                        list(command) if not isinstance(command, str) else command), path=spare.path,
                        cgroup_id=spare.cgroup_id, procs_files=spare.procs_files, priority=priority,
                        mem_hint_bytes=mem_hint_bytes, start_monotonic_s=start_mono, start_wall_s=start_wall,
                        created_sandbox=False, _tree=self.tree, grace_s=grace_s, join_fds=spare.join_fds,
                        parked=spare.parked)
        try:
            if priority != "normal":
                set_priority(self.tree, spare.path, priority)
            if self.monitor is not None:
                self.monitor.watch(spare.cgroup_id)
        except BaseException:
            call.release_parked()
            self._discard(call.sandbox, call.call_id, call.path, False, call.cgroup_id, call.join_fds)
            raise
        return self._started(call)

    def _started(self, call: ToolCall) -> ToolCall:
        with self._lock:
            self._calls[call.call_id] = call
        if self.control is not None:
            try:
                call.extra.update(admission_wait_s=self.control.admit(call)["waited_s"])
            except BaseException:
                self.control.cancel(call)
                self.discard(call)
                raise
        return call

    def _new_owner(self, owner: CallOwner) -> None:
        """write_owner for a new call id, in three syscalls: a new file (O_EXCL, never through
        a link) and one write(2), which a kill cannot split. A reader that opens it between
        the two sees an empty file, which read_owner refuses: it is skipped, never acted on."""
        if self._owner_dir is None:
            from agentcg.controller.reaper import calls_dir
            from agentcg.safefile import ensure_private_dir

            self._owner_dir = str(ensure_private_dir(calls_dir(self.state), 0o700))
        path = f"{self._owner_dir}/{validate_name(owner.call_id, 'call id')}.json"
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except (FileExistsError, FileNotFoundError):   # a directory made again, or an id seen: the slow way
            self._owner_dir = None
            write_owner(owner, self.state)
            return
        try:
            os.write(fd, json.dumps(vars(owner), sort_keys=True).encode())
        finally:
            os.close(fd)

    def forget_dirs(self, sandbox: str) -> None:
        """`sandbox` was made, removed or moved (an adopted container): look its dirs up again."""
        self._tools_dirs.pop(sandbox, None)

    def _procs_files(self, sandbox: str, call_id: str) -> list[Path]:
        """procs_files() of a call of `sandbox`, from its tools directory in each hierarchy
        (looked up once per sandbox: a call's cgroup is a directory below it)."""
        bases = self._tools_dirs.get(sandbox)
        if bases is None:
            bases = [str(p.parent.parent) for p in procs_files(self.tree, call_path(sandbox, "x"))]
            if len(self._tools_dirs) > 1024:
                self._tools_dirs.clear()
            self._tools_dirs[sandbox] = bases
        return [Path(f"{base}/{call_id}/cgroup.procs") for base in bases]

    def adopt(self, call: ToolCall) -> None:
        """Take over a running call that another manager (an earlier daemon) began: own its
        owner file, so other agentcg processes' reap_orphans() leave it alone, and watch it in
        eBPF again (fresh programs count from zero: its eBPF fields cover the time since)."""
        write_owner(CallOwner(call.call_id, call.sandbox, self.tree.root, os.getpid(), self._owner_ticks,
                              call.start_wall_s, call.created_sandbox), self.state)
        if self.monitor is not None:
            try:
                self.monitor.watch(call.cgroup_id)
            except AgentcgError:
                pass  # over MAX_CGROUPS: the call is tracked, its eBPF fields stay None
        with self._lock:
            self._calls[call.call_id] = call

    def note(self, call_id: str, action: str, message: str) -> None:
        """Record what a policy did to a running call; it goes into the call's record."""
        call = self.get(call_id)
        call.policy_action, call.policy_message = action, message

    def get(self, call_id: str) -> ToolCall:
        with self._lock:
            call = self._calls.get(call_id)
        if call is None:
            raise CgroupGone(f"no running tool call {call_id!r}")
        return call

    def running(self) -> list[ToolCall]:
        with self._lock:
            return list(self._calls.values())

    def returned(self, call: ToolCall, exit_code: int | None = None, signal: int | None = None, *,
                 at_monotonic_s: float | None = None) -> None:
        """The call's main process is done (at `at_monotonic_s`, default now): start its
        grace period (non-blocking)."""
        if call.has_returned:
            return
        _check_status(exit_code, signal)
        call.release_parked()   # never used: it would keep the cgroup populated
        call.exit_code, call.signal = exit_code, signal
        now = time.monotonic()
        at = now if at_monotonic_s is None else min(at_monotonic_s, now)
        call.returned_monotonic_s, call.returned_wall_s = at, time.time() - (now - at)

    def finish_due(self, now_s: float | None = None) -> list[ToolCallRecord]:
        """Finish every returned call whose cgroup is empty or whose grace period is over."""
        now_s = time.monotonic() if now_s is None else now_s
        done = []
        for call in self.running():
            if call.has_returned and (not self._populated(call) or now_s >= call.returned_monotonic_s + call.grace_s):
                try:
                    done.append(self._finish(call))
                except AgentcgError as exc:   # one stuck call must not lose the others' records
                    log.error("tool call %s/%s could not be finished: %s", call.sandbox, call.call_id, exc)
        return done

    def end(self, call: ToolCall, exit_code: int | None = None, signal: int | None = None,
            grace_s: float | None = None) -> ToolCallRecord:
        """`returned`, then wait until the cgroup is empty or the grace period is over (then
        kill it), read the counters, forget the BPF entries, remove the cgroup, append and
        return the record."""
        if grace_s is not None:
            call.grace_s = _check_grace(grace_s)
        self.returned(call, exit_code, signal)
        sleep_s = _FINISH_POLL_S[0]
        deadline = call.returned_monotonic_s + call.grace_s
        while True:
            if not self._populated(call):
                return self._finish(call, empty=True)   # read once: it cannot refill itself
            if time.monotonic() >= deadline:
                return self._finish(call)
            time.sleep(min(sleep_s, max(0.0, deadline - time.monotonic())))
            sleep_s = min(sleep_s * 2, _FINISH_POLL_S[1])

    def discard(self, call: ToolCall) -> None:
        """Remove a call that never ran anything (a spare): no record."""
        with self._lock:
            self._calls.pop(call.call_id, None)
        call.release_parked()
        self._discard(call.sandbox, call.call_id, call.path, call.created_sandbox, call.cgroup_id, call.join_fds)

    def flush(self, timeout_s: float = 10.0) -> bool:
        """Wait for the background removals and refills (no-op without a pool)."""
        return self.pool.flush(timeout_s) if self.pool is not None else True

    def close(self, *, kill: bool = True) -> list[ToolCallRecord]:
        """End every running call (killing what is left when `kill`) and return their records;
        then remove the spare cgroups and finish the queued removals."""
        records = []
        for call in self.running():
            self.returned(call)
            if kill:
                call.grace_s = 0.0
            records.append(self.end(call))
        if self.pool is not None:
            self.pool.close()
        return records

    # ---- internals --------------------------------------------------------------
    def _populated(self, call: ToolCall) -> bool:
        try:
            return self.tree.is_populated(call.path)
        except CgroupGone:
            return False

    def _finish(self, call: ToolCall, empty: bool = False) -> ToolCallRecord:
        """`empty`: the caller just read the cgroup empty (no process left can add one)."""
        with self._lock:
            if self._calls.pop(call.call_id, None) is None:
                raise CgroupGone(f"tool call {call.call_id!r} has already ended")
        call.release_parked()
        killed_after_grace = False
        try:
            if not empty and self._populated(call):
                self.tree.kill(call.path)
                killed_after_grace = True
                _wait_empty(self.tree, call.path, 5.0)
            record = self._record(call)
            if call.policy_action is not None:
                record.policy_action, record.message = call.policy_action, call.policy_message
            elif killed_after_grace:
                record.policy_action = "grace_kill"
                record.message = f"background processes still ran {call.grace_s:g} s after the call returned; killed"
        except BaseException:
            self._discard(call.sandbox, call.call_id, call.path, call.created_sandbox, call.cgroup_id, call.join_fds)
            raise
        self._append(record)   # kept even if the clean-up below fails
        if self.control is not None:
            self.control.ended(record)
        self._discard(call.sandbox, call.call_id, call.path, call.created_sandbox, call.cgroup_id, call.join_fds)
        return record

    def _record(self, call: ToolCall) -> ToolCallRecord:
        return read_record(self.tree, self.monitor, call)

    def _discard(self, sandbox: str, call_id: str, path: str, created_sandbox: bool,
                 cgroup_id: int | None = None, join_fds: list[int] | None = None) -> None:
        """Forget the BPF entries, remove the cgroup, the owner file and a sandbox made for it
        (with a pool: the BPF entries now, the rest in its thread, off the caller's path)."""
        if self.monitor is not None and cgroup_id is not None and cgroup_id in self.monitor.watched():
            self.monitor.forget(cgroup_id)
        fds = tuple(join_fds or ())
        if join_fds:
            join_fds.clear()   # a second discard of the same call must not close them twice
        if self.pool is not None and not created_sandbox:
            # a call that made its sandbox removes both now: whoever comes next finds neither
            self.pool.defer(Removal(sandbox, call_id, path, fds))
            return
        for fd in fds:
            os.close(fd)
        try:
            self.tree.remove(path)
        except CgroupGone:
            pass
        finally:
            remove_owner(call_id, self.state)
        # no marker, no auto-created sandbox to remove: one stat instead of the lock file (a
        # marker is only made with the sandbox, which cannot be re-made while this call was in it)
        if auto_created(self.tree, sandbox, self.state):
            with sandbox_lock(self.tree, sandbox, self.state):
                remove_auto_sandbox_if_unused(self.tree, sandbox, self.state)

    def _append(self, record: ToolCallRecord) -> None:
        if self.records_path is not None:
            append_record(self.records_path, record, self.records_mode, self.records_gid)


def _wait_empty(tree: CgroupTree, path: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if not tree.is_populated(path):
                return
        except CgroupGone:
            return
        time.sleep(0.001)


def _check_grace(grace_s: float) -> float:
    if isinstance(grace_s, bool) or not isinstance(grace_s, (int, float)) or not 0 <= grace_s <= 3600:
        raise InvalidInput(f"grace period must be 0..3600 seconds, got {grace_s!r}")
    return float(grace_s)


def _check_status(exit_code: int | None, signal: int | None) -> None:
    if exit_code is not None and (isinstance(exit_code, bool) or not isinstance(exit_code, int)
                                  or not 0 <= exit_code <= 255):
        raise InvalidInput(f"exit_code must be 0..255, got {exit_code!r}")
    if signal is not None and (isinstance(signal, bool) or not isinstance(signal, int) or not 1 <= signal <= 64):
        raise InvalidInput(f"signal must be 1..64, got {signal!r}")


def tool_name(tool: str | None, command: Sequence[str] | str) -> str:
    """The given tool name, else the command's program name (basename of argv[0])."""
    if tool is None:
        first = command.split(None, 1)[0] if isinstance(command, str) and command.strip() else (
            command[0] if not isinstance(command, str) and command else "")
        tool = os.path.basename(first) or "unknown"
    if not isinstance(tool, str) or not tool or len(tool) > MAX_TOOL_CHARS or not tool.isprintable():
        raise InvalidInput(f"tool name must be 1..{MAX_TOOL_CHARS} printable characters, got {tool!r}")
    return tool


