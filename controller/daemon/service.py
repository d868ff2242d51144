"""The daemon: one epoll loop in the main thread over the API socket and its clients,
the /metrics endpoint, PSI trigger fds and a self-pipe for signals; the eBPF ring buffer
is drained (timeout 0) every turn, and a timer runs the housekeeping (finishing calls
whose grace period is over, owners that died, stalled clients) and the policy tick.

Start-up adopts what an earlier daemon left (state.py), so `kill -9` loses nothing.
Shutdown (SIGTERM/SIGINT) goes through `shutdown()` only, and leaves sandboxes and
running calls in place for the next daemon to adopt.
"""
from __future__ import annotations

import logging
import math
import os
import select
import signal
import socket
import time
from pathlib import Path
from typing import Any, Callable

from agentcg.controller.cgroup import UNLIMITED, CgroupTree, open_tree
from agentcg.controller.daemon import bpfstats
from agentcg.controller.daemon.api import DEFERRED, Api
from agentcg.controller.daemon.calls import DaemonCalls
from agentcg.controller.daemon.config import DaemonConfig, parse_address, resolve_group
from agentcg.controller.daemon.exec_watch import ExecWatch
from agentcg.controller.daemon.engine import EngineHub, EngineLink, make_kv_policy, read_records_tail
from agentcg.controller.daemon.metrics import (
    HTTP_TIMEOUT_S, DaemonStats, HttpConnection, http_response, make_registry,
)
from agentcg.controller.daemon.server import (
    ApiError, Connection, UnixListener, encode_error, encode_result, error_code, parse_request,
)
from agentcg.controller.daemon.state import (
    Adoption, CallEntry, DaemonState, SandboxEntry, load_state, plan_adoption, save_state,
)
from agentcg.controller.psi import PressureTrigger
from agentcg.controller.reaper import process_start_ticks, reap_orphans
from agentcg.controller.sandbox import PRIORITY_CPU_WEIGHT, ensure_sandbox, remove_sandbox, sandbox_lock
from agentcg.controller.toolcall import ToolCall
from agentcg.engine_protocol import Directive, decode as decode_engine_line, encode as encode_engine_line
from agentcg.errors import AgentcgError, BpfError, CgroupGone, InvalidInput, ProtocolError
from agentcg.policies.kv import POLICY_NAMES as KV_POLICY_NAMES
from agentcg.policies.kv.predictor import ToolSignal
from agentcg.records import ToolCallRecord

log = logging.getLogger("agentcg.daemon")

OWNER_CHECK_S = 0.25          # how often owners of running calls are checked for life
FINISH_POLL_S = 0.02          # loop timeout while a call waits to be finished
BPF_POLL_S = 0.05             # loop timeout while eBPF is loaded (ring buffer drained each turn)
IDLE_POLL_S = 0.5
MAX_HTTP_CONNECTIONS = 16

_IN = select.EPOLLIN | select.EPOLLRDHUP


class Daemon:
    def __init__(self, config: DaemonConfig) -> None:
        self.config = config
        self.tree: CgroupTree = None  # type: ignore[assignment]   # set by start()
        self.monitor: Any = None
        self.calls: DaemonCalls = None  # type: ignore[assignment]
        self.state = DaemonState()
        self.stats = DaemonStats(max_tool_labels=config.metrics.max_tool_labels)
        self.adoption: Adoption | None = None
        self.metrics_address: str | None = None
        self.api = Api(self)
        self.exec_watch = ExecWatch(self)            # `sandbox exec` through the daemon (exec_watch.py)
        self.api.ops.update(self.exec_watch.ops())
        self._policy_name = config.policy.name
        self._dry_run = config.policy.dry_run
        self._epoll: select.epoll | None = None
        self._handlers: dict[int, Callable[[int, int], None]] = {}
        self._listener: UnixListener | None = None
        self._metrics_sock: socket.socket | None = None
        self._registry: Any = None
        self._conns: dict[int, Connection] = {}
        self._http: dict[int, HttpConnection] = {}
        self._triggers: dict[str, PressureTrigger] = {}        # "" = the root, else a sandbox
        self._trigger_refused: set[str] = set()                # warned once, not retried
        self._waiters: dict[str, list[tuple[Connection, int | None]]] = {}
        self._signal_pipe: tuple[int, int] | None = None
        self._old_signals: dict[int, Any] = {}
        self._bpf_stats_fd: int | None = None
        self._stop = False
        self._next_tick = 0.0
        self._next_owner_check = 0.0
        self._observed_at: float | None = None
        self._policy: Any = None
        e = config.engine
        self.engines = EngineHub(e.kv_policy, e.max_links, e.max_requests, e.host_reserve_bytes, e.kv_floor_bytes,
                                 calls_of=self._calls_of, known_sandbox=lambda name: name in self.state.sandboxes)

    # ---- lifecycle ----------------------------------------------------------------
    def run(self) -> int:
        try:
            self.start()
            self.loop()
        finally:
            self.shutdown()
        return 0

    def request_stop(self, *_: Any) -> None:
        self._stop = True

    def start(self) -> None:
        cfg = self.config
        self._protect_self()
        self.tree = open_tree(root=cfg.daemon.cgroup_root)
        cfg.daemon.state_dir.mkdir(parents=True, exist_ok=True)
        self.monitor = self._load_bpf()
        self.calls = DaemonCalls(self.tree, monitor=self.monitor, records_path=cfg.records_path,
                                 grace_s=cfg.limits.grace_s, state=cfg.daemon.state_dir)
        self._epoll = select.epoll()
        self._adopt()
        self._policy = self._make_policy(self._policy_name, self._dry_run)
        if cfg.engine.kv_policy not in KV_POLICY_NAMES:
            make_kv_policy(cfg.engine.kv_policy)     # a custom policy that cannot load fails the start
        self._arm_trigger("")
        for name in self.state.sandboxes:
            self._arm_trigger(name)
        gid = resolve_group(cfg.daemon.socket_group) if cfg.daemon.socket_group is not None else None
        self._listener = UnixListener(cfg.daemon.socket_path, cfg.daemon.socket_mode, gid)
        self._register(self._listener.fileno(), _IN, self._on_accept)
        if cfg.metrics.address:
            self._listen_metrics(cfg.metrics.address)
        self._install_signals()
        self._next_tick = time.monotonic() + cfg.policy.tick_s
        log.info("agentcg daemon %d: socket %s, cgroup root %s (%s), eBPF %s, metrics %s, adopted %s",
                 os.getpid(), cfg.daemon.socket_path, self.tree.root, self.tree.kind,
                 "on" if self.monitor else "off", self.metrics_address or "off",
                 self.adoption.summary() if self.adoption else {})

    def shutdown(self) -> None:
        """The one clean-up path: close every fd we opened. Sandboxes and running calls
        stay (the next daemon adopts them); the state file already says what they are."""
        for conn in list(self._conns.values()):
            self._drop(conn)
        for http in list(self._http.values()):
            self._drop_http(http)
        for scope in list(self._triggers):
            self._disarm_trigger(scope)
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        if self._metrics_sock is not None:
            self._metrics_sock.close()
            self._metrics_sock = None
        self.exec_watch.close()
        if self.monitor is not None:
            self.monitor.close()
            self.monitor = None
        bpfstats.disable_bpf_stats(self._bpf_stats_fd)
        self._bpf_stats_fd = None
        self._restore_signals()
        if self._epoll is not None:
            self._epoll.close()
            self._epoll = None
        self._handlers.clear()

    def _protect_self(self) -> None:
        try:
            Path("/proc/self/oom_score_adj").write_text(str(self.config.daemon.oom_score_adj))
        except OSError as exc:
            log.warning("cannot set oom_score_adj %d: %s", self.config.daemon.oom_score_adj, exc.strerror)
        priority = self.config.daemon.realtime_priority
        if priority:
            # As SCHED_OTHER the loop can wait a scheduler slice behind a busy tool call
            # (bench/bench_reaction.py); it sleeps in epoll, so SCHED_FIFO cannot starve the host.
            try:
                os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(priority))
            except OSError as exc:
                log.warning("cannot run as SCHED_FIFO %d: %s", priority, exc.strerror)

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

    # ---- adoption -----------------------------------------------------------------
    def _adopt(self) -> None:
        cfg = self.config
        try:
            saved = load_state(cfg.state_path)
        except InvalidInput as exc:
            aside = cfg.state_path.with_name(cfg.state_path.name + f".corrupt-{int(time.time())}")
            os.replace(cfg.state_path, aside)
            log.error("%s; moved it to %s and adopt from the cgroup tree alone", exc, aside)
            saved = DaemonState()
        plan = plan_adoption(self.tree, saved, time.monotonic(), time.time(), cfg.limits.grace_s)
        foreign = self._live_foreign_owners(saved)
        for entry in plan.sandboxes:
            self.state.sandboxes[entry.name] = entry
        for entry in plan.recreate:
            try:
                with sandbox_lock(self.tree, entry.name, cfg.daemon.state_dir):
                    ensure_sandbox(self.tree, entry.name)
                    self.apply_sandbox_limits(entry, entry.set_fields())
                self.state.sandboxes[entry.name] = entry
            except AgentcgError as exc:
                log.error("cannot recreate sandbox %s: %s", entry.name, exc)
        known = [c for c in plan.calls if c.call_id in saved.calls]
        for entry in known:
            self._adopt_call(entry)
        reaped = reap_orphans(self.tree, cfg.daemon.state_dir)   # dead `agentcg run`s, not ours
        for gone in reaped:
            self.stats.observe_action("reap", "owner_dead")
        for entry in plan.calls:
            if entry.call_id in saved.calls or entry.call_id in foreign or any(r.call_id == entry.call_id for r in reaped):
                continue
            if self.tree.exists(f"{entry.sandbox}/tools/{entry.call_id}"):
                self._adopt_call(entry)
        for entry in plan.lost:
            self._record_lost(entry)
        self.adoption = plan
        self.save()

    def _live_foreign_owners(self, saved: DaemonState) -> set[str]:
        """Call ids with an owner file of a live process other than a daemon's: a local
        `agentcg run` owns them, and the daemon leaves them alone."""
        from agentcg.controller.reaper import is_alive, list_owners

        return {owner.call_id for _, owner in list_owners(self.config.daemon.state_dir)
                if owner is not None and owner.call_id not in saved.calls and is_alive(owner)}

    def _adopt_call(self, entry: CallEntry) -> None:
        try:
            call = self.calls.adopt_entry(entry)
        except CgroupGone:
            self._record_lost(entry)
            return
        self.state.calls[entry.call_id] = entry
        if entry.owner_pid == 0:       # found in the tree only: nobody will end it
            self.calls.returned(call)
        self.stats.observe_action("adopt", "restart")

    def _record_lost(self, entry: CallEntry) -> None:
        record = ToolCallRecord(
            sandbox=entry.sandbox, call_id=entry.call_id, tool=entry.tool, command=entry.command,
            start_monotonic_s=entry.start_monotonic_s, start_wall_s=entry.start_wall_s,
            end_monotonic_s=time.monotonic(), end_wall_s=time.time(), exit_code=entry.exit_code,
            signal=entry.signal, priority=entry.priority, mem_hint_bytes=entry.mem_hint_bytes,
            message="the call's cgroup vanished while the daemon was down; nothing was measured",
            extra={"lost": True})
        self.calls._append(record)
        self.stats.observe_call(record)
        self.stats.observe_action("lost", "cgroup_vanished")
        self.state.calls.pop(entry.call_id, None)

    def save(self) -> None:
        save_state(self.config.state_path, self.state)

    # ---- sandboxes and calls (used by the API) ------------------------------------
    def add_sandbox(self, entry: SandboxEntry) -> None:
        self.state.sandboxes[entry.name] = entry
        self._arm_trigger(entry.name)
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
        with sandbox_lock(self.tree, name, self.config.daemon.state_dir):
            try:
                remove_sandbox(self.tree, name)
            except CgroupGone:
                pass
        self._forget_sandbox(name)

    def _forget_sandbox(self, name: str) -> None:
        self.state.sandboxes.pop(name, None)
        self._disarm_trigger(name)
        self.save()

    def end_call(self, call: ToolCall, exit_code: int | None, signal_number: int | None,
                 waiter: tuple[Connection, int | None] | None) -> None:
        """The call returned: answer `waiter` with the record once the call is finished."""
        self.calls.returned(call, exit_code, signal_number)
        self._engine_call_ended(call.call_id)
        entry = self.state.calls.get(call.call_id)
        if entry is not None and entry.returned_monotonic_s is None:
            entry.returned_monotonic_s, entry.returned_wall_s = call.returned_monotonic_s, call.returned_wall_s
            entry.exit_code, entry.signal = call.exit_code, call.signal
            self.save()
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
        running = {c.call_id for c in self.calls.running()}
        for record in records:
            self._call_finished(record)
        for call_id in [c for c in self._waiters if c not in running]:   # failed to finish: say so
            for conn, request_id in self._waiters.pop(call_id):
                self._answer(conn, encode_error(request_id, "internal",
                                                f"tool call {call_id} could not be finished; see the daemon's log"))

    def _call_finished(self, record: ToolCallRecord) -> None:
        entry = self.state.calls.pop(record.call_id, None)
        self.stats.observe_call(record)
        self._engine_call_ended(record.call_id)
        self._guarded(self.engines.learn, record)
        if self._policy is not None:
            self._policy.call_ended(record)
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
    def _make_policy(self, name: str, dry_run: bool) -> Any:
        if name == "none":
            return None
        from agentcg.controller.daemon.policy import PolicyRunner
        return PolicyRunner(name, self, dry_run, self.config.policy.host_budget_bytes)

    def policy_info(self) -> dict[str, Any]:
        from agentcg.policies.sandbox import POLICY_NAMES
        return {"name": self._policy_name, "dry_run": self._dry_run, "tick_s": self.config.policy.tick_s,
                "host_budget_bytes": self.config.policy.host_budget_bytes, "available": list(POLICY_NAMES)}

    def set_policy(self, name: str, dry_run: bool | None) -> None:
        dry_run = self._dry_run if dry_run is None else dry_run
        self._policy = self._make_policy(name, dry_run)
        self._policy_name, self._dry_run = name, dry_run
        log.info("policy %s%s", name, " (dry run)" if dry_run else "")

    def _decide_now(self, observed_at: float) -> None:
        """Something needs a decision (PSI, eBPF): tick at once, latency from `observed_at`."""
        self._observed_at = observed_at if self._observed_at is None else min(self._observed_at, observed_at)
        self._next_tick = min(self._next_tick, observed_at)

    def _tick(self, now: float) -> None:
        self.stats.ticks += 1
        observed_at, self._observed_at = self._observed_at or now, None
        if "" not in self._triggers:
            self._arm_trigger("")
        budget = self.config.policy.host_budget_bytes
        sandbox_bytes = self._sandbox_bytes() if self.engines.links and budget is not None else 0
        if self._policy is not None:
            try:
                if budget is not None:   # the sandboxes get what the host KV pools cannot give back
                    self._policy.host_budget_bytes = self.engines.sandbox_budget_bytes(budget, sandbox_bytes)
                applied = self._policy.tick(observed_at)
            except Exception:  # a policy bug must not take the daemon (and every sandbox's API) down
                log.exception("policy %s failed this tick; the next tick tries again", self._policy_name)
                self.stats.observe_action("error", "policy_failed")
                applied = []
            now = time.monotonic()
            for item in applied:
                if item.ok and not item.dry_run and item.action.call_id is not None:
                    self._send_directives(self.engines.tool_signal(item.action.call_id, item.action.kind, now))
        if self.engines.links:
            self._send_directives(self.engines.host_pressure(time.monotonic(), budget, sandbox_bytes))

    # ---- the loop -----------------------------------------------------------------
    def loop(self) -> None:
        assert self._epoll is not None
        while not self._stop:
            now = time.monotonic()
            for fd, mask in self._epoll.poll(self._timeout(now)):
                handler = self._handlers.get(fd)
                if handler is not None:
                    self._guarded(handler, fd, mask)
                if self._stop:
                    break
            self._guarded(self._housekeeping, time.monotonic())

    def _guarded(self, fn: Callable[..., None], *args: Any) -> None:
        """Run one unit of loop work; a bug in it is logged, the loop goes on."""
        try:
            fn(*args)
        except Exception:
            log.exception("internal error in %s; carrying on", getattr(fn, "__name__", fn))

    def _timeout(self, now: float) -> float:
        timeout = min(IDLE_POLL_S, max(0.0, self._next_tick - now))
        if self.monitor is not None:
            timeout = min(timeout, BPF_POLL_S)
        if any(c.has_returned for c in self.calls.running()):
            timeout = min(timeout, FINISH_POLL_S)
        wake = self.engines.next_wake_s()
        if wake is not None:
            timeout = min(timeout, max(0.0, wake - now))
        return timeout

    def _housekeeping(self, now: float) -> None:
        if self.exec_watch.watches:
            self.exec_watch.on_housekeeping()
        if self.monitor is not None:
            self._drain_bpf()
        if now >= self._next_owner_check:
            self._next_owner_check = now + OWNER_CHECK_S
            self._check_owners()
        if any(c.has_returned for c in self.calls.running()):
            self.finish_due()
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
        for http in list(self._http.values()):
            if now - http.started > HTTP_TIMEOUT_S:
                self._drop_http(http)
        if now >= self._next_tick:
            self._next_tick = now + self.config.policy.tick_s
            self._tick(now)

    def _drain_bpf(self) -> None:
        try:
            events = self.monitor.poll(0)
        except AgentcgError as exc:
            log.error("eBPF poll: %s", exc)
            return
        now = time.monotonic()
        for event in events:
            kind = type(event).__name__.removesuffix("Event").lower()
            self.stats.bump(self.stats.bpf_events, kind)
            if kind in ("rssthreshold", "oomvictim", "reclaimstall"):
                self._decide_now(now)

    def _check_owners(self) -> None:
        for call in self.calls.running():
            entry = self.state.calls.get(call.call_id)
            if call.has_returned or entry is None or entry.owner_pid == 0:
                continue
            if process_start_ticks(entry.owner_pid) != entry.owner_start_ticks:
                log.info("owner %d of tool call %s died; the call ends after its grace period",
                         entry.owner_pid, call.call_id)
                self.end_call(call, None, None, waiter=None)
                self.stats.observe_action("end", "owner_dead")

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

    def _install_signals(self) -> None:
        r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._signal_pipe = (r, w)
        signal.set_wakeup_fd(w, warn_on_full_buffer=False)
        for signum in (signal.SIGTERM, signal.SIGINT):
            self._old_signals[signum] = signal.signal(signum, self.request_stop)
        self._register(r, select.EPOLLIN, self._on_signal)

    def _restore_signals(self) -> None:
        for signum, handler in self._old_signals.items():
            signal.signal(signum, handler)
        self._old_signals.clear()
        if self._signal_pipe is not None:
            signal.set_wakeup_fd(-1)
            self._unregister(self._signal_pipe[0])
            for fd in self._signal_pipe:
                os.close(fd)
            self._signal_pipe = None

    def _on_signal(self, fd: int, mask: int) -> None:
        try:
            os.read(fd, 512)
        except BlockingIOError:
            pass

    # ---- API clients --------------------------------------------------------------
    def _on_accept(self, fd: int, mask: int) -> None:
        assert self._listener is not None
        for _ in range(64):
            accepted = self._listener.accept()
            if accepted is None:
                return
            sock, peer = accepted
            conn = Connection(sock, peer, time.monotonic())
            if len(self._conns) >= self.config.protocol.max_connections:
                conn.send(encode_error(None, "busy", f"{self.config.protocol.max_connections} connections are "
                                                     "open (max_connections); retry later"))
                conn.close()
                self.stats.observe_request("connect", "busy")
                continue
            self._conns[conn.fileno()] = conn
            self._register(conn.fileno(), _IN, self._on_client)

    def _on_client(self, fd: int, mask: int) -> None:
        conn = self._conns.get(fd)
        if conn is None:
            return
        now = time.monotonic()
        if mask & select.EPOLLIN and not conn.receive(now):
            self._drop(conn)
            return
        if mask & select.EPOLLOUT and not conn.flush():
            self._drop(conn)
            return
        if mask & (select.EPOLLERR | select.EPOLLHUP) and not conn.inbuf:
            self._drop(conn)
            return
        self._serve(conn)

    def _serve(self, conn: Connection) -> None:
        now = time.monotonic()
        while not conn.busy and not conn.closing:
            try:
                line = conn.next_line(now)
            except ApiError as exc:
                conn.send(encode_error(None, exc.code, str(exc)))
                conn.closing = True
                self.stats.observe_request("unknown", exc.code)
                break
            if line is None:
                break
            link = self.engines.get(conn.fileno())
            if link is not None:
                self._engine_line(conn, link, line)
                continue
            response = self._handle(conn, line)
            if response is not None:
                conn.send(response)
        if conn.busy and len(conn.inbuf) > 4 * 64 * 1024:
            conn.closing = True    # pipelining megabytes behind a waiting request: drop it
        self._update_interest(conn)

    def _handle(self, conn: Connection, line: bytes) -> bytes | None:
        request_id = None
        op_label = "unknown"
        try:
            request = parse_request(line)
            request_id = request.id
            handler = self.api.ops.get(request.op)
            if handler is None:
                raise ApiError("invalid_input", f"unknown op {request.op[:64]!r}; known: {', '.join(self.api.ops)}")
            op_label = request.op
            result = handler(conn, request)
            if result is DEFERRED:
                self.stats.observe_request(op_label, "ok")
                return None
            self.stats.observe_request(op_label, "ok")
            return encode_result(request_id, result)
        except AgentcgError as exc:
            code = error_code(exc)
            request_id = getattr(exc, "request_id", request_id)
            self.stats.observe_request(op_label, code)
            return encode_error(request_id, code, str(exc))
        except Exception as exc:  # a bug must not take the daemon down: answer and log it
            log.exception("internal error serving %s", op_label)
            self.stats.observe_request(op_label, "internal")
            return encode_error(request_id, "internal", f"{type(exc).__name__}: {exc}")

    def _answer(self, conn: Connection, data: bytes) -> None:
        if conn.fileno() < 0 or self._conns.get(conn.fileno()) is not conn:
            return  # the client went away while waiting
        conn.busy = False
        conn.last_active = time.monotonic()
        conn.send(data)
        self._serve(conn)

    def _update_interest(self, conn: Connection) -> None:
        if self._conns.get(conn.fileno()) is not conn:
            return
        if conn.closing and not conn.outbuf:
            self._drop(conn)
            return
        events = _IN | (select.EPOLLOUT if conn.outbuf else 0)
        assert self._epoll is not None
        self._epoll.modify(conn.fileno(), events)

    def _drop(self, conn: Connection) -> None:
        fd = conn.fileno()
        if fd >= 0 and self._conns.get(fd) is conn:
            del self._conns[fd]
            self._unregister(fd)
            link = self.engines.detach(fd)
            if link is not None:
                log.info("engine link %d (%s) closed; its %d requests are forgotten", link.link_id,
                         link.registration.engine_id if link.registration else "unregistered", len(link.requests))
        for waiters in self._waiters.values():
            waiters[:] = [w for w in waiters if w[0] is not conn]
        conn.close()

    # ---- engine links (docs/daemon-protocol.md, "Engine links") ---------------------
    def attach_engine(self, conn: Connection) -> EngineLink:
        """`engine.attach`: from now on `conn` speaks the engine protocol."""
        if len(self.engines.links) >= self.config.engine.max_links:
            raise ApiError("busy", f"{self.config.engine.max_links} engines are attached ([engine] max_links)")
        link = self.engines.attach(conn.fileno(), history=lambda: read_records_tail(self.config.records_path))
        log.info("engine link %d attached (pid %d, uid %d), KV policy %s", link.link_id, conn.peer.pid,
                 conn.peer.uid, link.policy_name)
        return link

    def _engine_line(self, conn: Connection, link: EngineLink, line: bytes) -> None:
        try:
            directives = link.on_message(decode_engine_line(line), time.monotonic())
        except ProtocolError as exc:
            self.engines.counters.protocol_errors += 1
            conn.send(encode_error(None, "invalid_input", f"engine protocol: {exc}; the connection is closed"))
            conn.closing = True
            return
        self._send_directives([(link, directives)], update=False)

    def _send_directives(self, batches: list[tuple[EngineLink, list[Directive]]], update: bool = True) -> None:
        """Write directives to their engines (asynchronously: the loop flushes the rest)."""
        for link, directives in batches:
            conn = self._conns.get(link.fd)
            if conn is None or self.engines.get(link.fd) is not link:
                continue
            for directive in directives:
                try:
                    conn.send(encode_engine_line(directive))
                except ProtocolError as exc:      # a policy's directive too large to encode
                    log.error("engine link %d: %s", link.link_id, exc)
            if update:
                self._update_interest(conn)

    def engine_tool_began(self, call: ToolCall) -> None:
        if self.engines.links:   # a bug here must not fail the tool call: guarded
            self._guarded(lambda: self._send_directives(self.engines.tool_call_began(
                call.sandbox, call.tool, call.command, call.call_id, time.monotonic())))

    def _engine_call_ended(self, call_id: str) -> None:
        if self.engines.links:
            self._guarded(lambda: self._send_directives(self.engines.tool_call_ended(call_id, time.monotonic())))

    def _calls_of(self, sandbox: str) -> list[tuple[str, ToolSignal | None]]:
        """The running tool calls of `sandbox`, oldest first, with what a policy did to them."""
        frozen = getattr(self._policy, "frozen", set())
        throttled = getattr(self._policy, "throttle", {})
        calls = sorted((c for c in self.calls.running() if c.sandbox == sandbox and not c.has_returned),
                       key=lambda c: c.start_monotonic_s)
        return [(c.call_id, ToolSignal.FROZEN if c.call_id in frozen else
                 ToolSignal.THROTTLED if c.call_id in throttled else None) for c in calls]

    def _sandbox_bytes(self) -> int:
        try:
            return self.tree.memory_current("")
        except AgentcgError:
            return 0

    # ---- /metrics -----------------------------------------------------------------
    def _listen_metrics(self, address: str) -> None:
        host, port = parse_address(address)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
            sock.listen(16)
        except OSError as exc:
            sock.close()
            raise InvalidInput(f"metrics address {address}: {exc.strerror}; choose another [metrics] address "
                               "or \"\" to disable") from None
        self._metrics_sock = sock
        bound = sock.getsockname()
        self.metrics_address = f"[{bound[0]}]:{bound[1]}" if family == socket.AF_INET6 else f"{bound[0]}:{bound[1]}"
        self._registry = make_registry(self)
        self._register(sock.fileno(), select.EPOLLIN, self._on_metrics_accept)

    def _on_metrics_accept(self, fd: int, mask: int) -> None:
        assert self._metrics_sock is not None
        try:
            sock, _ = self._metrics_sock.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            return
        if len(self._http) >= MAX_HTTP_CONNECTIONS:
            sock.close()
            return
        sock.setblocking(False)
        http = HttpConnection(sock, time.monotonic())
        self._http[sock.fileno()] = http
        self._register(sock.fileno(), select.EPOLLIN, self._on_http)

    def _on_http(self, fd: int, mask: int) -> None:
        http = self._http.get(fd)
        if http is None:
            return
        if not http.answered:
            try:
                head = http.receive()
            except (OSError, ValueError):
                self._drop_http(http)
                return
            if head is None:
                return
            http.answer(*http_response(head, self._registry))
        if http.flush():
            self._drop_http(http)
        else:
            assert self._epoll is not None
            self._epoll.modify(fd, select.EPOLLOUT)

    def _drop_http(self, http: HttpConnection) -> None:
        fd = http.fileno()
        if fd >= 0:
            self._http.pop(fd, None)
            self._unregister(fd)
        http.close()

    # ---- PSI ----------------------------------------------------------------------
    def _arm_trigger(self, scope: str) -> None:
        psi = self.config.psi
        if (not psi.enabled or scope in self._triggers or scope in self._trigger_refused
                or "psi" not in self.tree.capabilities):
            return
        if not self.tree.exists(scope):
            return
        try:
            trigger = self.tree.pressure_trigger(scope, "memory", "some", psi.stall_s, psi.window_s)
        except AgentcgError as exc:
            log.warning("no PSI trigger on %s: %s", scope or "the root", exc)
            self._trigger_refused.add(scope)
            return
        self._triggers[scope] = trigger
        self._register(trigger.fileno(), select.EPOLLPRI | select.EPOLLERR,
                       lambda fd, mask, scope=scope: self._on_pressure(scope, mask))

    def _disarm_trigger(self, scope: str) -> None:
        self._trigger_refused.discard(scope)
        trigger = self._triggers.pop(scope, None)
        if trigger is not None:
            self._unregister(trigger.fileno())
            trigger.close()

    def _on_pressure(self, scope: str, mask: int) -> None:
        if mask & select.EPOLLERR:          # the cgroup was removed under the trigger
            self._disarm_trigger(scope)
            return
        self.stats.bump(self.stats.psi_triggers, "root" if scope == "" else "sandbox")
        self._decide_now(time.monotonic())

