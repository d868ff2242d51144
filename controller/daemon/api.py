"""The socket API's operations (docs/daemon-protocol.md): typed arguments, who may call
what (from the peer's credentials), and what each operation does to the daemon.

A handler returns the result object, or DEFERRED when the answer comes later (a
`toolcall.end` waiting for the call's processes); it raises an agentcg error otherwise,
which the service turns into the protocol's error code.
"""
from __future__ import annotations

import os
import time
from typing import Any, Callable, Protocol

from agentcg.controller.daemon.begin_keys import BeginKeys
from agentcg.controller.daemon.server import ApiError, Connection, PeerCred, Request
from agentcg.controller.daemon.state import CallEntry, SandboxEntry
from agentcg.controller.reaper import process_start_ticks
from agentcg.controller.sandbox import ensure_sandbox, parse_priority, remove_sandbox, sandbox_lock, validate_name
from agentcg.controller.toolcall import ToolCall, tool_name
from agentcg.errors import AgentcgError, CgroupGone, InvalidInput
from agentcg.policies.sandbox import PRIORITY_CPU_WEIGHT
from agentcg.procfs import PROC

DEFERRED = object()
MAX_COMMAND_ITEMS = 4096


class ApiHost(Protocol):
    """What the operations need from the daemon (service.Daemon implements it); the API
    never imports the service, so the two do not import each other."""

    config: Any
    tree: Any
    calls: Any
    state: Any
    stats: Any
    monitor: Any
    engines: Any
    adoption: Any
    metrics_address: str | None

    def save(self) -> None: ...
    def add_sandbox(self, entry: SandboxEntry) -> None: ...
    def apply_sandbox_limits(self, entry: SandboxEntry, fields: set[str]) -> None: ...
    def apply_call_limits(self, call: ToolCall) -> dict[str, Any]: ...
    def remove_sandbox(self, name: str) -> None: ...
    def end_call(self, call: ToolCall, exit_code: int | None, signal_number: int | None,
                 waiter: tuple[Connection, int | None] | None) -> None: ...
    def admit_or_wait(self, call: ToolCall, conn: Connection, request_id: int | None,
                      result: dict[str, Any]) -> bool: ...
    def events_since(self, seq: int, sandbox: str | None) -> dict[str, Any]: ...
    def control_summary(self) -> dict[str, Any]: ...
    def engine_tool_began(self, call: ToolCall) -> None: ...
    def policy_info(self) -> dict[str, Any]: ...
    def set_policy(self, name: str, dry_run: bool | None) -> None: ...
    def attach_engine(self, conn: Connection) -> Any: ...


class Args:
    """Typed reads of a request's `args`; unknown names are refused at `done()`."""

    def __init__(self, request: Request) -> None:
        self.raw, self.op, self.read = request.args, request.op, set()

    def has(self, name: str) -> bool:
        self.read.add(name)
        return name in self.raw

    def str(self, name: str, required: bool = True, default: Any = None) -> Any:
        value = self._get(name, required, default)
        if value is not default and not isinstance(value, str):
            raise ApiError("invalid_input", f"{self.op}: '{name}' must be a string, got {value!r}")
        return value

    def int(self, name: str, low: int, high: int, required: bool = False, nullable: bool = False) -> Any:
        value = self._get(name, required, None)
        if value is None:
            if name in self.raw and not nullable:
                raise ApiError("invalid_input", f"{self.op}: '{name}' must be an integer, got null")
            return None
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise ApiError("invalid_input", f"{self.op}: '{name}' must be an integer in {low}..{high}, got {value!r}")
        return value

    def number(self, name: str, low: float, high: float) -> float | None:
        value = self._get(name, False, None)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
            raise ApiError("invalid_input", f"{self.op}: '{name}' must be a number in {low}..{high}, got {value!r}")
        return float(value)

    def _get(self, name: str, required: bool, default: Any) -> Any:
        self.read.add(name)
        if name not in self.raw:
            if required:
                raise ApiError("invalid_input", f"{self.op}: missing argument '{name}'")
            return default
        return self.raw[name]

    def done(self) -> None:
        unknown = sorted(set(self.raw) - self.read)
        if unknown:
            raise ApiError("invalid_input", f"{self.op}: unknown argument(s) {', '.join(unknown)}; "
                                            f"it takes {', '.join(sorted(self.read)) or 'none'}")


def peer_sandbox(peer_pid: int, root: str) -> str | None:
    """The sandbox the peer's process lives in (from its v2 cgroup path), or None."""
    try:
        path = PROC.v2_cgroup(peer_pid)
    except AgentcgError:   # gone, or a file we may not read: in no sandbox we know of
        return None
    prefix = f"/{root}/"
    if path and path.startswith(prefix):
        return path[len(prefix):].split("/", 1)[0] or None
    return None


class Api:
    def __init__(self, daemon: ApiHost) -> None:
        self.d = daemon
        self.keys = BeginKeys(daemon, DEFERRED)
        self.ops: dict[str, Callable[[Connection, Request], Any]] = {
            "ping": self.ping, "state": self.state,
            "sandbox.create": self.sandbox_create, "sandbox.remove": self.sandbox_remove,
            "sandbox.update": self.sandbox_update, "sandbox.list": self.sandbox_list, "sandbox.get": self.sandbox_get,
            "toolcall.begin": self.toolcall_begin, "toolcall.attach": self.toolcall_attach,
            "toolcall.end": self.toolcall_end, "policy.get": self.policy_get, "policy.set": self.policy_set,
            "engine.attach": self.engine_attach, "events.since": self.events_since,
        }

    # ---- who may call what ---------------------------------------------------------
    def _root_only(self, peer: PeerCred, op: str) -> None:
        if not peer.is_root:
            raise ApiError("forbidden", f"{op} is for root only (you are uid {peer.uid}); ask the host's "
                                        "administrator, or run the daemon's client as root")

    def _may_act_on(self, peer: PeerCred, sandbox: str, what: str) -> None:
        if peer.is_root:
            return
        own = peer_sandbox(peer.pid, self.d.tree.root)
        if own != sandbox:
            where = f"sandbox {own!r}" if own else "no sandbox"
            raise ApiError("forbidden", f"{what}: a process in {where} (uid {peer.uid}) may act only on its own "
                                        f"sandbox, not on {sandbox!r}")

    def _sandbox(self, name: Any) -> SandboxEntry:
        entry = self.d.state.sandboxes.get(validate_name(name))
        if entry is None or not self.d.tree.exists(name):
            raise ApiError("not_found", f"no sandbox {name!r}; create it with sandbox.create (root)")
        return entry

    def _call(self, call_id: Any) -> ToolCall:
        validate_name(call_id, "call id")
        try:
            return self.d.calls.get(call_id)
        except CgroupGone:
            raise ApiError("not_found", f"no running tool call {call_id!r}; it ended already or never began") from None

    # ---- operations ---------------------------------------------------------------
    def ping(self, conn: Connection, req: Request) -> dict[str, Any]:
        Args(req).done()
        return {"version": 1, "daemon_pid": os.getpid()}

    def state(self, conn: Connection, req: Request) -> dict[str, Any]:
        Args(req).done()
        self._root_only(conn.peer, req.op)
        d = self.d
        return {"daemon_pid": os.getpid(), "cgroup_root": d.tree.root, "ebpf": d.monitor is not None,
                "metrics_address": d.metrics_address, "policy": d.config.policy.name,
                "adoption": d.adoption.summary() if d.adoption else None,
                "sandboxes": [self.sandbox_object(e) for e in d.state.sandboxes.values()],
                "running_calls": [self.call_object(c) for c in d.calls.running()],
                "engines": d.engines.summaries(), **d.control_summary(),
                "counters": {"tool_calls_ended": sum(d.stats.calls.values()),
                             "actions": sum(d.stats.actions.values()),
                             "requests": sum(d.stats.requests.values())}}

    def sandbox_create(self, conn: Connection, req: Request) -> dict[str, Any]:
        a = Args(req)
        name = validate_name(a.str("name"))
        priority = parse_priority(a.str("priority", required=False, default="normal"))
        entry = SandboxEntry(name, priority, a.int("memory_budget_bytes", 1, 2**62),
                             a.int("cpu_weight", 1, 10000), a.int("pids_max", 1, 4_194_304))
        a.done()
        self._root_only(conn.peer, req.op)
        d = self.d
        if name in d.state.sandboxes or d.tree.exists(name):
            raise ApiError("exists", f"sandbox {name!r} exists already; sandbox.update changes its settings")
        if len(d.state.sandboxes) >= d.config.limits.max_sandboxes:
            raise ApiError("busy", f"{d.config.limits.max_sandboxes} sandboxes exist (max_sandboxes); remove some")
        with sandbox_lock(d.tree, name, d.config.daemon.state_dir):
            ensure_sandbox(d.tree, name)
            try:
                d.apply_sandbox_limits(entry, entry.set_fields())
            except BaseException:
                remove_sandbox(d.tree, name)
                raise
        d.add_sandbox(entry)
        return self.sandbox_object(entry)

    def sandbox_update(self, conn: Connection, req: Request) -> dict[str, Any]:
        a = Args(req)
        name = a.str("name")
        changes: dict[str, Any] = {}
        if a.has("priority"):
            changes["priority"] = parse_priority(a.str("priority"))
        for key, low, high in (("memory_budget_bytes", 1, 2**62), ("cpu_weight", 1, 10000), ("pids_max", 1, 4_194_304)):
            if a.has(key):
                changes[key] = a.int(key, low, high, nullable=True)
        a.done()
        self._root_only(conn.peer, req.op)
        entry = self._sandbox(name)
        new = SandboxEntry(**{**entry.__dict__, **changes})
        self.d.apply_sandbox_limits(new, set(changes))
        self.d.state.sandboxes[name] = new
        self.d.save()
        return self.sandbox_object(new)

    def sandbox_remove(self, conn: Connection, req: Request) -> dict[str, Any]:
        a = Args(req)
        name = a.str("name")
        a.done()
        self._root_only(conn.peer, req.op)
        self._sandbox(name)
        self.d.remove_sandbox(name)
        return {}

    def sandbox_list(self, conn: Connection, req: Request) -> dict[str, Any]:
        Args(req).done()
        own = None if conn.peer.is_root else peer_sandbox(conn.peer.pid, self.d.tree.root)
        return {"sandboxes": [self.sandbox_object(e) for n, e in sorted(self.d.state.sandboxes.items())
                              if conn.peer.is_root or n == own]}

    def sandbox_get(self, conn: Connection, req: Request) -> dict[str, Any]:
        a = Args(req)
        name = a.str("name")
        a.done()
        self._may_act_on(conn.peer, validate_name(name), req.op)
        entry = self._sandbox(name)
        result = self.sandbox_object(entry)
        result["calls"] = [self.call_object(c) for c in self.d.calls.running() if c.sandbox == name]
        return result

    def toolcall_begin(self, conn: Connection, req: Request) -> dict[str, Any]:
        a = Args(req)
        sandbox = validate_name(a.str("sandbox"))
        command = a._get("command", False, None)
        if command is None:
            command = ""
        elif isinstance(command, list):
            if len(command) > MAX_COMMAND_ITEMS or not all(isinstance(x, str) for x in command):
                raise ApiError("invalid_input", f"{req.op}: 'command' must be a string or a list of at most "
                                                f"{MAX_COMMAND_ITEMS} strings")
        elif not isinstance(command, str):
            raise ApiError("invalid_input", f"{req.op}: 'command' must be a string or a list of strings")
        tool = tool_name(a.str("tool", required=False), command)
        mem_hint = a.int("mem_hint_bytes", 1, 2**62)
        priority = parse_priority(a.str("priority", required=False, default="normal"))
        pid = a.int("pid", 1, 2**22)
        grace_s = a.number("grace_s", 0.0, 3600.0)
        key = self.keys.read(req.op, a.raw) if a.has("request_key") else None
        a.done()
        peer, d = conn.peer, self.d
        self._may_act_on(peer, sandbox, req.op)
        again = self.keys.repeated(conn, req, sandbox, key) if key is not None else None
        if again is not None:        # a resent begin (begin_keys.py): the same call
            return again
        if sandbox not in d.state.sandboxes and not peer.is_root:
            raise ApiError("not_found", f"no sandbox {sandbox!r}; root creates it with sandbox.create")
        if len(d.calls.running()) >= d.config.limits.max_running_calls:
            raise ApiError("busy", f"{d.config.limits.max_running_calls} tool calls are running (max_running_calls)")
        if pid is not None:
            self._check_pid(peer, pid, sandbox)
        call = d.calls.begin(sandbox, tool, command, mem_hint_bytes=mem_hint, priority=priority, grace_s=grace_s,
                             create_sandbox=peer.is_root)
        try:
            limits = d.apply_call_limits(call)
            if not peer.is_root:
                _hand_over(d, call, peer.uid)
            if pid is not None:
                call.attach(pid)
        except BaseException:
            d.calls.discard(call)   # it never ran: no record, no stats, nothing for policies to learn
            raise
        if call.created_sandbox and sandbox not in d.state.sandboxes:
            d.add_sandbox(SandboxEntry(sandbox, priority="normal", ephemeral=True))
        d.state.calls[call.call_id] = CallEntry(
            call_id=call.call_id, sandbox=sandbox, tool=call.tool, command=call.command,
            start_monotonic_s=call.start_monotonic_s, start_wall_s=call.start_wall_s, priority=priority,
            mem_hint_bytes=mem_hint, grace_s=call.grace_s, created_sandbox=call.created_sandbox,
            owner_pid=peer.pid, owner_start_ticks=process_start_ticks(peer.pid) or 0, owner_uid=peer.uid)
        self.keys.remember(call.call_id, key)
        d.save()
        result = {"call_id": call.call_id, "cgroup_procs": [str(p) for p in call.procs_files],
                  "cgroup_id": call.cgroup_id, "limits": limits}
        if pid is not None:          # its process runs already: nothing to hold back
            d.engine_tool_began(call)
            return result
        return result if d.admit_or_wait(call, conn, req.id, result) else DEFERRED

    def toolcall_attach(self, conn: Connection, req: Request) -> dict[str, Any]:
        a = Args(req)
        call_id, pid = a.str("call_id"), a.int("pid", 1, 2**22, required=True)
        a.done()
        call = self._call(call_id)
        self._may_act_on(conn.peer, call.sandbox, req.op)
        self._check_pid(conn.peer, pid, call.sandbox)
        call.attach(pid)
        return {}

    def toolcall_end(self, conn: Connection, req: Request) -> Any:
        a = Args(req)
        call_id = a.str("call_id")
        exit_code, signal = a.int("exit_code", 0, 255), a.int("signal", 1, 64)
        a.done()
        call = self._call(call_id)
        self._may_act_on(conn.peer, call.sandbox, req.op)
        self.d.end_call(call, exit_code, signal, waiter=(conn, req.id))
        return DEFERRED

    def policy_get(self, conn: Connection, req: Request) -> dict[str, Any]:
        Args(req).done()
        self._root_only(conn.peer, req.op)
        return self.d.policy_info()

    def policy_set(self, conn: Connection, req: Request) -> dict[str, Any]:
        a = Args(req)
        name = a.str("name")
        from agentcg.policies.sandbox import POLICY_NAMES
        if name not in POLICY_NAMES:
            raise ApiError("invalid_input", f"{req.op}: unknown policy {name!r}; available: {', '.join(POLICY_NAMES)}")
        dry_run = a._get("dry_run", False, None)
        if dry_run is not None and not isinstance(dry_run, bool):
            raise ApiError("invalid_input", f"{req.op}: 'dry_run' must be true or false, got {dry_run!r}")
        a.done()
        self._root_only(conn.peer, req.op)
        self.d.set_policy(name, dry_run)
        return self.d.policy_info()

    def events_since(self, conn: Connection, req: Request) -> dict[str, Any]:
        """The daemon's event log from `seq` on (CONTRACTS interface 4); a non-root peer
        sees only its own sandbox's events."""
        a = Args(req)
        seq = a.int("seq", 0, 2**62, required=True)
        sandbox = a.str("sandbox", required=False)
        a.done()
        if sandbox is not None:
            self._may_act_on(conn.peer, validate_name(sandbox), req.op)
        elif not conn.peer.is_root:
            sandbox = peer_sandbox(conn.peer.pid, self.d.tree.root)
            if sandbox is None:
                raise ApiError("forbidden", f"{req.op}: a process outside every sandbox (uid {conn.peer.uid}) "
                                            "may not read the event log; name your sandbox or ask root")
        try:
            return self.d.events_since(seq, sandbox)
        except InvalidInput as exc:
            raise ApiError("invalid_input", f"{req.op}: {exc}") from None

    def engine_attach(self, conn: Connection, req: Request) -> dict[str, Any]:
        """This connection becomes an engine link: after this answer it carries engine
        protocol lines (agentcg.engine_protocol) both ways, first a `register` from the engine."""
        Args(req).done()
        self._may_attach_engine(conn.peer)
        from agentcg.engine_protocol import MAX_LINE_BYTES, PROTOCOL_VERSION
        link = self.d.attach_engine(conn)
        return {"link_id": link.link_id, "engine_protocol": PROTOCOL_VERSION, "kv_policy": link.policy_name,
                "max_line_bytes": MAX_LINE_BYTES}

    def _may_attach_engine(self, peer: PeerCred) -> None:
        cfg = self.d.config.engine
        if peer.is_root or peer.uid in cfg.uids:
            return
        if cfg.group is not None:
            from agentcg.controller.daemon.config import resolve_group
            gid = resolve_group(cfg.group)
            if peer.gid == gid or gid in _supplementary_groups(peer.pid):
                return
        raise ApiError("forbidden", f"engine.attach: uid {peer.uid} may not attach an engine; run the engine as root, "
                                    "or list its uid ([engine] uids) or group ([engine] group) in the daemon's config")

    # ---- helpers ------------------------------------------------------------------
    def _check_pid(self, peer: PeerCred, pid: int, sandbox: str) -> None:
        """A non-root peer may move only its own processes that live in its sandbox."""
        if peer.is_root:
            return
        try:
            uid = PROC.status(pid).uids[0]
        except AgentcgError:
            raise ApiError("not_found", f"process {pid} does not exist") from None
        if uid != peer.uid or peer_sandbox(pid, self.d.tree.root) != sandbox:
            raise ApiError("forbidden", f"process {pid} is not yours or not in sandbox {sandbox!r}")

    def sandbox_object(self, entry: SandboxEntry) -> dict[str, Any]:
        try:
            cgroup_id = self.d.tree.cgroup_id(entry.name)
        except CgroupGone:
            cgroup_id = None
        weight = entry.cpu_weight if entry.cpu_weight is not None else PRIORITY_CPU_WEIGHT[entry.priority]
        return {"name": entry.name, "priority": entry.priority, "memory_budget_bytes": entry.memory_budget_bytes,
                "cpu_weight": weight, "pids_max": entry.pids_max, "cgroup_id": cgroup_id,
                "ephemeral": entry.ephemeral,
                "running_calls": sum(1 for c in self.d.calls.running() if c.sandbox == entry.name)}

    def call_object(self, call: ToolCall) -> dict[str, Any]:
        entry = self.d.state.calls.get(call.call_id)
        return {"call_id": call.call_id, "sandbox": call.sandbox, "tool": call.tool, "command": call.command,
                "start_wall_s": call.start_wall_s, "age_s": time.monotonic() - call.start_monotonic_s,
                "returned": call.has_returned, "cgroup_id": call.cgroup_id,
                "owner_pid": entry.owner_pid if entry else None, "adopted": entry.adopted if entry else 0}


def _supplementary_groups(pid: int) -> frozenset[int]:
    try:
        return PROC.status(pid).groups
    except AgentcgError:
        return frozenset()


def _hand_over(d: ApiHost, call: ToolCall, uid: int) -> None:
    """Let a non-root peer's child join the call: its cgroup.procs files, and on the v2
    tree the sandbox's too (v2 checks write access at the common ancestor of the source
    and destination cgroups: <sandbox>, for a peer in <sandbox>/agent)."""
    files = list(call.procs_files) + [d.tree.cgroup_dir(call.sandbox, "v2") / "cgroup.procs"]
    for path in files:
        os.chown(path, uid, -1)
