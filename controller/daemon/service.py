"""The daemon: one epoll loop in the main thread over its I/O adapters (the API socket
and its clients, the /metrics endpoint (http.py), PSI trigger fds (psi_triggers.py), the
eBPF ring buffer's epoll fd and memcg threshold eventfds (reaction.py), engine links, a
self-pipe for signals); a timer runs the housekeeping (finishing calls whose grace period
is over, owners that died, stalled clients) and the policy tick. Every decision goes
through the control core (controller/core, wrapped by control.py): the tick, a PSI
trigger, a kernel threshold crossing and a `toolcall.begin` waiting for admission.

Start-up adopts what an earlier daemon left (state.py), so `kill -9` loses nothing. It
changes nothing (no state, owner or cgroup file) until this daemon holds the state
directory's lock, the cgroup root's lock and the socket (`_claim`): a second daemon on
the same state directory, root or socket refuses before touching anything.
Shutdown (SIGTERM/SIGINT) goes through `shutdown()` only, and leaves sandboxes and
running calls in place for the next daemon to adopt. SIGHUP, SIGUSR1/2, SIGALRM and the
other signals whose default would end the daemon are ignored (docs/daemon.md, "Restart
safety"): a stray `kill -HUP` must not take every sandbox's API down.
"""
from __future__ import annotations

import logging
import math
import os
import select
import time
from pathlib import Path
from typing import Any, Callable

from agentcg.controller.cgroup import UNLIMITED, CgroupTree
from agentcg.controller.core import EventLog
from agentcg.controller.daemon import bpfstats
from agentcg.controller.daemon.admission import DaemonAdmission
from agentcg.controller.daemon.api import Api, Args
from agentcg.controller.daemon.call_index import IndexedCalls
from agentcg.controller.daemon.claims import DaemonClaims
from agentcg.controller.daemon.clients import ClientConnections
from agentcg.controller.daemon.config import DaemonConfig, resolve_group
from agentcg.controller.daemon.control import DaemonControl
from agentcg.controller.daemon.engine import EngineHub, make_kv_policy
from agentcg.controller.daemon.exec_watch import ExecWatch
from agentcg.controller.daemon.engine_links import EngineLinks
from agentcg.controller.daemon.http import MetricsEndpoint
from agentcg.controller.daemon.metrics import DaemonStats, make_registry
from agentcg.controller.daemon.owners import UNKNOWN_CHECK_S, OwnedCalls, OwnerWatch
from agentcg.controller.daemon.psi_triggers import PsiTriggers
from agentcg.controller.daemon.removals import finish_failed
from agentcg.controller.daemon.reaction import Crossing, Reactor
from agentcg.controller.daemon.signals import DaemonSignals
from agentcg.controller.daemon.server import (
    ConnectionSlots, Connection, RateLimitedLog, UnixListener, encode_error, encode_result,
)
from agentcg.controller.daemon.state import Adoption, DaemonState, SandboxEntry, save_state
from agentcg.controller.sandbox import remove_sandbox, sandbox_lock
from agentcg.controller.toolcall import ToolCall
from agentcg.errors import AgentcgError, BpfError, CgroupGone
from agentcg.policies.kv import POLICY_NAMES as KV_POLICY_NAMES
from agentcg.policies.sandbox import PRIORITY_CPU_WEIGHT
from agentcg.records import ToolCallRecord

log = logging.getLogger("agentcg.daemon")

FINISH_POLL_S = 0.02          # loop timeout while a call waits to be finished
IDLE_POLL_S = 0.5

_IN = select.EPOLLIN | select.EPOLLRDHUP


class Daemon(DaemonClaims, DaemonSignals, DaemonAdmission, OwnedCalls, ClientConnections, EngineLinks):
    def __init__(self, config: DaemonConfig) -> None:
        self.config = config
        self.tree: CgroupTree = None  # type: ignore[assignment]   # set by start()
        self.monitor: Any = None
        self.calls: IndexedCalls = None  # type: ignore[assignment]
        self.state = DaemonState()
        self.stats = DaemonStats(max_tool_labels=config.metrics.max_tool_labels)
        self.adoption: Adoption | None = None
        self.containers: Any = None
        self.metrics_address: str | None = None
        self.api = Api(self)
        self.events = EventLog()
        self.control: DaemonControl = None  # type: ignore[assignment]   # set by start()
        self.reactor: Reactor | None = None
        self.exec_watch = ExecWatch(self)            # `sandbox exec` through the daemon (exec_watch.py)
        self.api.ops.update(self.exec_watch.ops())
        self._epoll: select.epoll | None = None
        self._handlers: dict[int, Callable[[int, int], None]] = {}
        self._listener: UnixListener | None = None
        self._metrics: MetricsEndpoint | None = None
        self._conns: dict[int, Connection] = {}
        self._unflushed: set[Connection] = set()     # answers made this loop turn (clients.py)
        self._in_turn = False                        # save() then only marks the state to save
        self._save_due = False
        self._triggers: PsiTriggers = None  # type: ignore[assignment]   # "" = the root, else a sandbox
        self._waiters: dict[str, list[tuple[Connection, int | None]]] = {}
        self._admission: dict[str, tuple[Connection, int | None, dict[str, Any], ToolCall]] = {}
        self._signal_pipe: tuple[int, int] | None = None
        self._old_signals: dict[int, Any] = {}
        self._bpf_stats_fd: int | None = None
        self._stop = False
        self._locks: list[int] = []
        self._root_lock_path: Path | None = None
        self._slots = ConnectionSlots(config.protocol.max_connections, config.protocol.max_connections_per_uid,
                                      config.protocol.root_connections)
        self._bad_requests = RateLimitedLog(log)
        self._ignored: list[int] = []
        self.owners: OwnerWatch | None = None
        self._unknown: set[str] = set()        # adopted calls nobody owns: recorded once empty
        self._next_unknown_check = 0.0
        self._next_tick = 0.0
        self._observed_at: float | None = None
        e = config.engine
        self.engines = EngineHub(e.kv_policy, e.max_links, e.max_requests, e.host_reserve_bytes, e.kv_floor_bytes,
                                 calls_of=self._calls_of, known_sandbox=lambda name: name in self.state.sandboxes,
                                 append=self.events.append)

    # ---- lifecycle ----------------------------------------------------------------
    def run(self) -> int:
        try:
            self._install_signals()      # first: a SIGHUP during start-up must not kill it either
            self.start()
            self.loop()
        finally:
            self.shutdown()
        return 0

    def request_stop(self, *_: Any) -> None:
        self._stop = True

    def start(self) -> None:
        cfg = self.config
        previous = self._claim()
        self._protect_self()
        from agentcg.controller.container_daemon import ContainerSandboxes   # adopted containers (docs/containers.md)
        self.tree = ContainerSandboxes.wrap(self.tree)      # opened by _claim (the root's lock)
        self.monitor = ContainerSandboxes.tap(self._load_bpf(), lambda: self.containers)
        self.calls = IndexedCalls(self.tree, monitor=self.monitor, records_path=cfg.records_path,
                                 grace_s=cfg.limits.grace_s, state=cfg.daemon.state_dir)
        self.calls.records_mode = cfg.daemon.records_mode
        self.calls.use_removals(self._lasting)      # finished calls' rmdir off the loop (removals.py)
        self.calls.records_gid = (resolve_group(cfg.daemon.socket_group)
                                  if cfg.daemon.socket_group is not None and cfg.daemon.records_mode & 0o040 else None)
        if self._epoll is None:
            self._epoll = select.epoll()
        self.owners = OwnerWatch()
        self._register(self.owners.fileno(), select.EPOLLIN, self._on_owner_exit)
        self.containers = ContainerSandboxes(self, Args)
        self.containers.restore()
        self.api.ops.update(self.containers.ops())
        self.control = DaemonControl(self.tree, self.calls, self.state, self.stats, cfg.policy, self.events)
        self._triggers = PsiTriggers(self.tree, cfg.psi, self._register, self._unregister, self._on_pressure)
        self._adopt(previous)
        if cfg.engine.kv_policy not in KV_POLICY_NAMES:
            make_kv_policy(cfg.engine.kv_policy)     # a custom policy that cannot load fails the start
        self.reactor = Reactor(self.tree, self.monitor, self.control.thresholds, self.stats, self._register,
                               self._unregister, self._call_of_cgroup, self._react, self.events.append,
                               enabled=cfg.policy.kernel_thresholds)
        self.reactor.start()
        self._triggers.arm("")
        for name in self.state.sandboxes:
            self._triggers.arm(name)
        self.reactor.arm_scopes(self.control.sandbox_budgets())
        self.exec_watch.restore()     # `sandbox exec` agents watched by an earlier daemon
        self._register(self._listener.fileno(), _IN, self._on_accept)
        if cfg.metrics.address:
            self._listen_metrics(cfg.metrics.address)
        self._next_tick = time.monotonic() + cfg.policy.tick_s
        log.info("agentcg daemon %d: socket %s, cgroup root %s (%s), eBPF %s, reaction %s, metrics %s, adopted %s",
                 os.getpid(), cfg.daemon.socket_path, self.tree.root, self.tree.kind,
                 "on" if self.monitor else "off", self.reactor.mode, self.metrics_address or "off",
                 self.adoption.summary() if self.adoption else {})

    def shutdown(self) -> None:
        """The one clean-up path: close every fd we opened. Sandboxes and running calls
        stay (the next daemon adopts them); the state file already says what they are."""
        if self._save_due:
            self._in_turn = False
            self.save()
        for conn in list(self._conns.values()):
            self._drop(conn)
        if self._metrics is not None:
            self._metrics.close()
            self._metrics = None
        if self._triggers is not None:
            self._triggers.close()
        if self.reactor is not None:
            self.reactor.close()
            self.reactor = None
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        self.exec_watch.close()
        if self.monitor is not None:
            self.monitor.close()
            self.monitor = None
        bpfstats.disable_bpf_stats(self._bpf_stats_fd)
        self._bpf_stats_fd = None
        if self.owners is not None:
            self.owners.close()
            self.owners = None
        if self.calls is not None and self.calls.removals is not None:
            self.calls.removals.close()      # what is queued goes now (a kill -9: clear_done at the next start)
        if self.state.journal is not None:
            self.state.journal.close()
            self.state.journal = None
        self._restore_signals()
        if self._epoll is not None:
            self._epoll.close()
            self._epoll = None
        self._handlers.clear()
        if self._root_lock_path is not None:   # still held: removed before it is released
            self._root_lock_path.unlink(missing_ok=True)
            self._root_lock_path = None
        for fd in self._locks:          # last: the next daemon may start from here on
            os.close(fd)
        self._locks.clear()

    def _load_bpf(self) -> Any:
        mode = self.config.ebpf.mode
        if mode == "off":
            return None
        try:
            from agentcg.bpf.monitor import BpfMonitor
            monitor = BpfMonitor(concerns=self.config.ebpf.concerns)
        except BpfError as exc:
            if mode == "on":
                raise
            log.warning("running without eBPF (mode auto): %s", exc)
            return None
        if self.config.ebpf.program_stats:
            self._bpf_stats_fd = bpfstats.enable_bpf_stats()
        return monitor

    def save(self) -> None:
        """Persist the state; inside a loop turn, once at its end, before any answer of the
        turn is sent (`_end_turn`): many begins and ends in one turn, one journal write."""
        if self._in_turn:
            self._save_due = True
        else:
            self._save_due = False
            save_state(self.config.state_path, self.state)

    # ---- sandboxes and calls (used by the API) ------------------------------------
    def add_sandbox(self, entry: SandboxEntry) -> None:
        self.calls.forget_dirs(entry.name)
        self.state.sandboxes[entry.name] = entry
        self._triggers.arm(entry.name)
        self.save()

    def apply_sandbox_limits(self, entry: SandboxEntry, fields: set[str]) -> None:
        """Write the cgroup settings named in `fields` for sandbox `entry.name`."""
        tree, name = self.tree, entry.name
        if "memory_budget_bytes" in fields:
            tree.set_memory(name, max=UNLIMITED if entry.memory_budget_bytes is None else entry.memory_budget_bytes)
        if fields & {"cpu_weight", "priority"} and ("cpu.weight" in tree.capabilities or entry.cpu_weight is not None):
            # an explicit weight on a host without the cpu controller raises ControllerMissing
            tree.set_cpu(name, weight=entry.cpu_weight if entry.cpu_weight is not None
                         else PRIORITY_CPU_WEIGHT[entry.priority])
        if "pids_max" in fields:
            tree.set_pids_max(name, UNLIMITED if entry.pids_max is None else entry.pids_max)

    def apply_call_limits(self, call: ToolCall) -> dict[str, Any]:
        pids_max = None
        if "pids.max" in self.tree.capabilities:
            pids_max = self.config.limits.call_pids_max
            self.tree.set_pids_max(call.path, pids_max)
        return {"pids_max": pids_max, "memory_max_bytes": None, "grace_s": call.grace_s}

    def remove_sandbox(self, name: str) -> None:
        victims = [c for c in self.calls.running() if c.sandbox == name]
        for call in victims:
            self.calls.returned(call)
            call.grace_s = 0.0
            self.stats.observe_action("kill", "sandbox_removed")
        self.finish_due()
        if self.calls.removals is not None:
            self.calls.removals.flush()      # its finished calls' cgroups first
            finish_failed(self.calls.removals, self.tree, self.config.daemon.state_dir)
        with sandbox_lock(self.tree, name, self.config.daemon.state_dir):
            try:
                remove_sandbox(self.tree, name)
            except CgroupGone:
                pass
        self._forget_sandbox(name)

    def _lasting(self, name: str) -> bool:
        """A sandbox made by sandbox.create: not an ephemeral one (its last call removes it,
        ToolCallManager._discard) nor an adopted container (its own tree)."""
        entry = self.state.sandboxes.get(name)
        return entry is not None and not entry.ephemeral and name not in self.containers.adopted

    def _forget_sandbox(self, name: str) -> None:
        self.calls.forget_dirs(name)
        self.state.sandboxes.pop(name, None)
        self._triggers.disarm(name)
        if self.reactor is not None:
            self.reactor.forget_scope(name)
        self.save()

    def end_call(self, call: ToolCall, exit_code: int | None, signal_number: int | None,
                 waiter: tuple[Connection, int | None] | None) -> None:
        """The call returned: answer `waiter` with the record once the call is finished."""
        self._cancel_admission(call)
        self.calls.returned(call, exit_code, signal_number)
        self._engine_call_ended(call.call_id)
        entry = self.state.calls.get(call.call_id)
        if entry is not None and entry.returned_monotonic_s is None:
            entry.returned_monotonic_s, entry.returned_wall_s = call.returned_monotonic_s, call.returned_wall_s
            entry.exit_code, entry.signal = call.exit_code, call.signal
            self.state.calls[call.call_id] = entry      # assigned again: the journal writes it
            self.save()
        if self.owners is not None:
            self.owners.forget(call.call_id)
        self._unknown.discard(call.call_id)
        if waiter is not None:
            waiter[0].busy = True
            self._waiters.setdefault(call.call_id, []).append(waiter)
        self.finish_due()

    def finish_due(self) -> None:
        """Finish the calls that are due, record them, answer whoever waits for them."""
        try:
            records = self.calls.finish_due()
        except AgentcgError as exc:
            log.error("finishing tool calls: %s", exc)
            records = []
        for record in records:
            self._call_finished(record)
        for call_id in [c for c in self._waiters if not self.calls.has(c)]:   # failed to finish: say so
            for conn, request_id in self._waiters.pop(call_id):
                self._answer(conn, encode_error(request_id, "internal",
                                                f"tool call {call_id} could not be finished; see the daemon's log"))

    def _call_finished(self, record: ToolCallRecord) -> None:
        entry = self.state.calls.pop(record.call_id, None)
        if self.owners is not None:
            self.owners.forget(record.call_id)
        self._unknown.discard(record.call_id)
        self.stats.observe_call(record)
        self._engine_call_ended(record.call_id)
        self._guarded(self.engines.learn, record)
        self.control.call_ended(record)
        if self.reactor is not None:
            self.reactor.call_ended(record.call_id)     # its memcg threshold's eventfd closes with it
        if record.policy_action == "grace_kill":
            self.stats.observe_action("kill", "grace_expired")
        for conn, request_id in self._waiters.pop(record.call_id, []):
            self._answer(conn, encode_result(request_id, {"record": record.to_dict()}))
        sandbox = self.state.sandboxes.get(record.sandbox)
        if sandbox is not None and sandbox.ephemeral and not self.tree.exists(record.sandbox):
            self._forget_sandbox(record.sandbox)
        elif entry is not None:
            self.save()

    # ---- policy -------------------------------------------------------------------
    def policy_info(self) -> dict[str, Any]:
        from agentcg.policies.sandbox import POLICY_NAMES
        return {"name": self.control.name, "dry_run": self.control.core.dry_run, "tick_s": self.config.policy.tick_s,
                "host_budget_bytes": self.config.policy.host_budget_bytes, "available": list(POLICY_NAMES),
                "reaction": self.reactor.mode if self.reactor else None,
                "thresholds": list(self.control.thresholds.fractions)}

    def set_policy(self, name: str, dry_run: bool | None) -> None:
        dry_run = self.control.core.dry_run if dry_run is None else dry_run
        self.control.set_policy(name, dry_run)
        log.info("policy %s%s", name, " (dry run)" if dry_run else "")

    def control_summary(self) -> dict[str, Any]:
        return {"pending_calls": self.control.pending_objects(), "reaction": self.reactor.mode if self.reactor else None,
                "events_next_seq": self.events.next_seq}

    def events_since(self, seq: int, sandbox: str | None) -> dict[str, Any]:
        return self.events.since(seq, sandbox)

    def pending_calls(self) -> int:
        return len(self.control.core.pending) if self.control is not None else 0

    def _decide_now(self, observed_at: float) -> None:
        """Something needs a decision (PSI): tick at once, latency from `observed_at`."""
        self._observed_at = observed_at if self._observed_at is None else min(self._observed_at, observed_at)
        self._next_tick = min(self._next_tick, observed_at)

    def _react(self, crossings: list[Crossing]) -> None:
        """A kernel threshold fired: decide now, in this loop turn, latency from the kernel's time."""
        for sandbox, call_id, observed_s, detail in crossings:
            self.control.core.crossed(sandbox, call_id, observed_s, detail, detail.get("rss_bytes"))
        self._step(min(c[2] for c in crossings), urgent=True)

    def _call_of_cgroup(self, cgroup_id: int) -> tuple[str, str] | None:
        call = self.calls.of_cgroup(cgroup_id)
        return (call.sandbox, call.call_id) if call is not None else None

    def _tick(self, now: float) -> None:
        if self.reactor is not None:
            self.reactor.drain()   # events submitted without a wake-up (BpfMonitor.fileno) are read here
        observed_at, self._observed_at = self._observed_at or now, None
        if "" not in self._triggers:
            self._triggers.arm("")
        self._step(observed_at)
        if self.engines.links:
            budget = self.config.policy.host_budget_bytes
            self._send_directives(self.engines.host_pressure(time.monotonic(), budget, self._sandbox_bytes()))

    def _step(self, observed_s: float, urgent: bool = False) -> None:
        """One control-core step, and everything that follows from it."""
        budget = self.config.policy.host_budget_bytes
        if budget is not None:   # the sandboxes get what the host KV pools cannot give back
            sandbox_bytes = self._sandbox_bytes() if self.engines.links else 0
            self.control.host_budget_bytes = self.engines.sandbox_budget_bytes(budget, sandbox_bytes)
        step = self.control.step(observed_s, urgent=urgent)
        if step is None:
            return
        now = time.monotonic()
        for item in step.applied:
            if item.ok and not item.dry_run and item.action.call_id is not None and item.action.kind != "admit":
                self._send_directives(self.engines.tool_signal(item.action.call_id, item.action.kind, now))
        for (_, call_id), action, waited in step.admitted:
            self._admitted(call_id, action.reason, waited)
        if self.reactor is not None:
            wanted = self.control.call_thresholds(step)     # only calls with a budget to reach
            self.reactor.arm_calls(wanted, self.calls.some(wanted))
            self.reactor.arm_scopes(self.control.sandbox_budgets())

    # ---- the loop -----------------------------------------------------------------
    def loop(self) -> None:
        assert self._epoll is not None
        while not self._stop:
            now = time.monotonic()
            events = self._epoll.poll(self._timeout(now))
            self._in_turn = True
            try:
                for fd, mask in events:
                    handler = self._handlers.get(fd)
                    if handler is not None:
                        self._guarded(handler, fd, mask)
                    if self._stop:
                        break
                self._guarded(self._housekeeping, time.monotonic())
            finally:
                self._in_turn = False
                self._guarded(self._end_turn)

    def _end_turn(self) -> None:
        """Save what the turn changed, then send what it answered (in that order: no answer
        leaves before the state it reports is written)."""
        saved = True
        if self._save_due:
            try:
                self.save()
            except (AgentcgError, OSError) as exc:   # the answers still go: a client must not hang on it
                saved, self._save_due = False, True   # tried again at the end of the next turn
                self._bad_requests.log(logging.ERROR, ("state", 0), "cannot save the state %s: %s",
                                       self.config.state_path, exc, now=time.monotonic())
        if saved and self.calls.removals is not None:
            self.calls.removals.release()    # after the save: the state no longer lists them
        self._flush_turn()

    def _guarded(self, fn: Callable[..., None], *args: Any) -> None:
        """Run one unit of loop work; a bug in it is logged, the loop goes on."""
        try:
            fn(*args)
        except Exception:
            log.exception("internal error in %s; carrying on", getattr(fn, "__name__", fn))

    def _timeout(self, now: float) -> float:
        timeout = min(IDLE_POLL_S, max(0.0, self._next_tick - now))
        if self.calls.any_returned():
            timeout = min(timeout, FINISH_POLL_S)
        wake = self.engines.next_wake_s()
        if wake is not None:
            timeout = min(timeout, max(0.0, wake - now))
        return timeout

    def _housekeeping(self, now: float) -> None:
        if self.control.core.pending:
            self._expire_admissions(now)
        if self.exec_watch.watches:
            self.exec_watch.on_housekeeping()
        if self._unknown and now >= self._next_unknown_check:
            self._next_unknown_check = now + UNKNOWN_CHECK_S
            self._check_unknown()
        if self.calls.any_returned():
            self.finish_due()
        if self.calls.removals is not None and self.calls.removals.failed:
            finish_failed(self.calls.removals, self.tree, self.config.daemon.state_dir)
        self.containers.housekeeping(now)
        wake = self.engines.next_wake_s()
        if wake is not None and now >= wake:
            self._send_directives(self.engines.wake(now))
        line_timeout, idle_timeout = self.config.protocol.line_timeout_s, self.config.protocol.idle_timeout_s
        for conn in list(self._conns.values()):
            # an engine link may be quiet for long: only a started line has a deadline
            idle = math.inf if self.engines.get(conn.fileno()) is not None else idle_timeout
            why = conn.expired(now, line_timeout, idle)
            if why is not None:
                if conn.line_started is not None:
                    conn.send(encode_error(None, "timeout", f"{why}; the connection is closed"))
                self._drop(conn)
        if self._metrics is not None:
            self._metrics.expire(now)
        if now >= self._next_tick:
            self._next_tick = now + self.config.policy.tick_s
            self._tick(now)

    def running_in(self, sandbox: str) -> int:
        return self.calls.running_in(sandbox)

    # ---- epoll plumbing -----------------------------------------------------------
    def _register(self, fd: int, events: int, handler: Callable[[int, int], None]) -> None:
        assert self._epoll is not None
        self._epoll.register(fd, events)
        self._handlers[fd] = handler

    def _unregister(self, fd: int) -> None:
        self._handlers.pop(fd, None)
        if self._epoll is not None:
            try:
                self._epoll.unregister(fd)
            except (OSError, ValueError):
                pass

    # ---- /metrics -----------------------------------------------------------------
    def _listen_metrics(self, address: str) -> None:
        self._metrics = MetricsEndpoint(address, make_registry(self), self._register, self._unregister,
                                        lambda fd, events: self._epoll.modify(fd, events))   # type: ignore[union-attr]
        self.metrics_address = self._metrics.address

    # ---- PSI ----------------------------------------------------------------------
    def _on_pressure(self, scope: str) -> None:
        self.stats.bump(self.stats.psi_triggers, "root" if scope == "" else "sandbox")
        self._decide_now(time.monotonic())
