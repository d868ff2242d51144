"""Containers as sandboxes in the daemon: `sandbox.adopt`, `sandbox.release`, the exec
watch inside adopted containers, and re-adoption after a restart.

Adopting container C as sandbox S: C's cgroup becomes S (mounted into the daemon's
MountedTree), its processes move into S/agent, and both C's cgroup and S/agent are watched
by eBPF with stop_at_exec. Every exec there is stopped by the kernel before its new image
runs; the loop (`on_events`) then decides:
- an exec in C's own cgroup came from outside: `podman exec` / `docker exec` (runc joins
  the container's cgroup; on cgroup v2 with controllers enabled it joins init's cgroup,
  S/agent, instead) -- always a tool call;
- an exec in S/agent whose parent is outside the container: the same, on v2;
- an exec in S/agent by a direct child of the container's init (the agent), or by init
  itself after its first exec, matching the tool globs (controller/autodetect.py) -- a
  tool call, as `agentcg sandbox exec` does;
- anything else (the agent's grandchildren, runc's own re-exec): left running where it is.
A tool call gets S/tools/<id>, the process (and what it forked before the move) is moved
there, and SIGCONT. Its record carries `extra.host_pid` and `extra.container_pid` (NSpid).
The call's owner is its own main process: when that exits (eBPF exit event, or the
daemon's owner check) the call ends and is recorded as every other call.

State: `<state_dir>/containers.json` (rewritten whole with rename). A restarted daemon
re-adopts each container whose init still runs; nothing is killed. A container that
exited (init gone, or its cgroup removed by the runtime) is released on its own.
"""
from __future__ import annotations

import logging
import math
import os
import signal
import time
from pathlib import Path
from typing import Any

from agentcg.controller.autodetect import _command_of, parse_globs
from agentcg.controller.cgroup.layout import CgroupLayout, detect_layout
from agentcg.controller.container import inspect_container, ns_pids, validate_container_ref
from agentcg.controller.container_cgroups import (
    ContainerCgroup, cgroups_of_pid, check_cgroup_path, classify, container_tree,
)
from agentcg.controller.container_nest import AGENT, Nesting, make_leaf, move_all, nest, unnest
from agentcg.controller.container_tree import MountedTree
from agentcg.controller.container_state import (
    MAX_ADOPTED, PROC, STATE_FILE, Adopted, memory_limit, load_adopted, save_adopted,
)
from agentcg.controller.daemon.server import ApiError
from agentcg.controller.daemon.state import CallEntry, SandboxEntry, load_state, save_state
from agentcg.controller.sandbox import parse_priority, validate_name
from agentcg.errors import AgentcgError, CgroupGone, InvalidInput
from agentcg.records import truncate_command


log = logging.getLogger("agentcg.daemon.containers")

ALIVE_CHECK_S = 0.25
FORGOTTEN_KEPT_S = 5.0          # a released container's stopped execs may still be in the ring buffer
LOST_EXIT_S = 0.5               # a command gone this long without its exit event: status unknown
_RUNC_NAMES = ("runc", "runc:[", "runc-dmz", "crun", "conmon")


class MonitorTap:
    """The daemon's BpfMonitor, with every batch `poll` returns shown to a listener first
    (the adopted containers' execs and exits), whoever drains the ring buffer."""

    def __init__(self, monitor: Any, listener: Any) -> None:
        self._monitor, self._listener = monitor, listener

    def poll(self, timeout_s: float = 0.0) -> list[Any]:
        events = self._monitor.poll(timeout_s)
        sandboxes = self._listener()
        if sandboxes is not None and events:
            try:
                sandboxes.on_events(events)
            except Exception:   # a bug here must not cost the daemon its events
                log.exception("adopted containers: handling %d eBPF events", len(events))
        return events

    def __getattr__(self, name: str) -> Any:
        return getattr(self._monitor, name)


class ContainerSandboxes:
    """The daemon's adopted containers. Runs in the daemon's loop thread only."""

    def __init__(self, daemon: Any, args: Any) -> None:
        """`daemon`: the Daemon (its tree, calls, state, api, monitor, config); `args`: the
        API's typed-argument reader (daemon.api.Args), passed in so that this module does
        not import the daemon's modules that import it back."""
        self.d = daemon
        self.args = args
        self.adopted: dict[str, Adopted] = {}
        self._by_cgroup: dict[int, Adopted] = {}
        self._by_pid: dict[int, str] = {}          # main pid -> call id
        self._dead_since: dict[int, float] = {}    # main pid gone, its exit event not seen yet
        self._stopping: dict[int, float] = {}      # cgroup ids watched with stop_at_exec (and lately forgotten)
        self._layout: CgroupLayout | None = None
        self._next_check = 0.0

    @staticmethod
    def wrap(tree: Any) -> MountedTree:
        return tree if isinstance(tree, MountedTree) else MountedTree(tree)

    @staticmethod
    def tap(monitor: Any, sandboxes: Any) -> Any:
        """`monitor` (or None) with its events shown to `sandboxes()` (None until it exists)."""
        return None if monitor is None else MonitorTap(monitor, sandboxes)

    @property
    def path(self) -> Path:
        return self.d.config.daemon.state_dir / STATE_FILE

    @property
    def layout(self) -> CgroupLayout:
        if self._layout is None:
            self._layout = detect_layout()
        return self._layout

    def ops(self) -> dict[str, Any]:
        """API operations to add to the daemon's (and guards on two existing ones)."""
        api = self.d.api
        remove, update = api.ops["sandbox.remove"], api.ops["sandbox.update"]

        def guarded(op: Any) -> Any:
            def handler(conn: Any, req: Any) -> Any:
                name = req.args.get("name") if isinstance(req.args, dict) else None
                if isinstance(name, str) and name in self.adopted:
                    raise ApiError("invalid_input", f"{req.op}: sandbox {name!r} is an adopted container; "
                                                    "release it with sandbox.release (and adopt it again to change "
                                                    "its budget)")
                return op(conn, req)
            return handler

        return {"sandbox.adopt": self.api_adopt, "sandbox.release": self.api_release,
                "sandbox.remove": guarded(remove), "sandbox.update": guarded(update)}

    # ---- API --------------------------------------------------------------------------
    def api_adopt(self, conn: Any, req: Any) -> dict[str, Any]:
        a = self.args(req)
        name = validate_name(a.str("name"))
        container = a.str("container", required=False)
        runtime = a.str("runtime", required=False)
        container_id = a.str("container_id", required=False)
        cgroup = a.str("cgroup", required=False)
        pid = a.int("pid", 1, 2**22)
        budget = a.int("memory_budget_bytes", 1, 2**62)
        priority = parse_priority(a.str("priority", required=False, default="normal"))
        tools, exclude = a.str("tools", required=False), a.str("exclude", required=False, default="")
        a.done()
        self.d.api._root_only(conn.peer, req.op)
        globs = parse_globs(tools) if tools is not None else None
        if sum(x is not None for x in (container, cgroup, pid)) != 1:
            raise ApiError("invalid_input", f"{req.op}: give exactly one of 'container' (id or name, with optional "
                                            "'runtime'), 'pid' (the container's init on the host) or 'cgroup'")
        if runtime is not None and runtime not in ("podman", "docker", "kubernetes", "systemd", "unknown"):
            raise ApiError("invalid_input", f"{req.op}: runtime {runtime!r} unknown (podman, docker, kubernetes, ...)")
        if container_id is not None and (len(container_id) > 128 or not container_id.isprintable()):
            raise ApiError("invalid_input", f"{req.op}: container_id must be up to 128 printable characters")
        if container is not None:
            info = inspect_container(validate_container_ref(container), runtime)
            pid, runtime, container_id = info.pid, info.runtime, info.container_id
        entry = self.adopt(name, pid=pid, cgroup=cgroup, runtime=runtime, container_id=container_id,
                           memory_budget_bytes=budget, priority=priority, tools=globs, exclude=parse_globs(exclude))
        return self.describe(entry)

    def api_release(self, conn: Any, req: Any) -> dict[str, Any]:
        a = self.args(req)
        name = validate_name(a.str("name"))
        a.done()
        self.d.api._root_only(conn.peer, req.op)
        if name not in self.adopted:
            raise ApiError("not_found", f"sandbox {name!r} is not an adopted container; `sandbox list` shows them")
        return {"released": name, "processes_moved_back": self.release(name, "released")}

    def describe(self, entry: Adopted) -> dict[str, Any]:
        return {**self.d.api.sandbox_object(self.d.state.sandboxes[entry.name]), "adopted": {
            "runtime": entry.runtime, "container_id": entry.container_id, "init_pid": entry.init_pid,
            "cgroup": "/" + entry.cgroup.v2, "driver": entry.cgroup.kind.driver, "budget_from": entry.budget_from,
            "made": entry.nesting.made, "enabled_controllers": entry.nesting.enabled}}

    # ---- adopt and release ------------------------------------------------------------
    def adopt(self, name: str, *, pid: int | None = None, cgroup: str | None = None, runtime: str | None = None,
              container_id: str | None = None, memory_budget_bytes: int | None = None,
              priority: str = "normal", tools: tuple[str, ...] | None = None, exclude: tuple[str, ...] = ()) -> Adopted:
        d = self.d
        if name in d.state.sandboxes or d.tree.exists(name):
            raise ApiError("exists", f"sandbox {name!r} exists already; choose another name")
        if len(self.adopted) >= MAX_ADOPTED:
            raise ApiError("busy", f"{MAX_ADOPTED} containers are adopted already")
        if pid is not None:
            cg = cgroups_of_pid(pid, self.layout)
        else:
            cg = self._cgroup_of_path(str(cgroup))
        for other in self.adopted.values():
            mine, theirs = cg.v2 + "/", other.cgroup.v2 + "/"
            if mine.startswith(theirs) or theirs.startswith(mine):
                raise ApiError("exists", f"cgroup /{cg.v2} is (inside) the container adopted already as sandbox "
                                         f"{other.name!r} (/{other.cgroup.v2}); release it first")
        kind = classify(cg.v2)
        tree = container_tree(self.layout, cg, own_root=d.tree.root)
        if pid is None:   # the oldest process of the cgroup stands for the container's life
            procs = sorted(int(x) for x in (tree.root_dir / "cgroup.procs").read_text().split())
            pid = procs[0] if procs else None
        entry = Adopted(name, cg, Nesting(), runtime or kind.runtime, container_id or kind.ident, pid,
                        PROC.start_ticks(pid) if pid else None, None, "none", tools=tools, exclude=exclude,
                        tree=tree)
        if memory_budget_bytes is not None:
            entry.memory_budget_bytes, entry.budget_from = memory_budget_bytes, "given"
        else:
            entry.memory_budget_bytes = memory_limit(tree)
            entry.budget_from = "container" if entry.memory_budget_bytes is not None else "none"
        self._start(entry, fresh=True)
        d.tree.mount(name, tree)
        d.add_sandbox(SandboxEntry(name, priority, entry.memory_budget_bytes))
        self.save()
        log.info("adopted %s container %s (/%s) as sandbox %s, budget %s (%s)", entry.runtime, entry.container_id,
                 cg.v2, name, entry.memory_budget_bytes, entry.budget_from)
        return entry

    def _cgroup_of_path(self, path: str) -> ContainerCgroup:
        layout = self.layout
        if layout.v2_mount is None:
            raise InvalidInput("no cgroup v2 tree is mounted here")
        directory = check_cgroup_path(layout.v2_mount, path, own_root=self.d.tree.root)
        relative = str(directory.relative_to(layout.v2_mount))
        v1 = {}
        if layout.kind == "hybrid":
            from agentcg.controller.cgroup.hybrid import JOINED_V1
            for controller in JOINED_V1:
                mount = layout.v1_mounts.get(controller)
                if mount is not None and (Path(mount) / relative / "cgroup.procs").is_file():
                    v1[controller] = relative
        return ContainerCgroup(relative, v1)

    def _start(self, entry: Adopted, fresh: bool) -> None:
        """Nest (fresh) or check the nesting (restart), then watch both cgroups in eBPF."""
        tree, monitor = entry.tree, self.d.monitor
        entry.root_id = tree.cgroup_id("")
        if fresh:
            if monitor is not None:   # watched before the move: an exec right after it is caught
                monitor.watch(entry.root_id, stop_at_exec=True)
                self._stopping[entry.root_id] = math.inf
            try:
                entry.nesting = nest(tree)
            except BaseException:
                if monitor is not None:
                    monitor.forget(entry.root_id)
                    self._stopping[entry.root_id] = time.monotonic() + FORGOTTEN_KEPT_S
                raise
        else:
            for leaf in (AGENT, "tools"):
                if make_leaf(tree, leaf) and leaf not in entry.nesting.made:
                    entry.nesting.made.append(leaf)
            if monitor is not None:
                monitor.watch(entry.root_id, stop_at_exec=True)
                self._stopping[entry.root_id] = math.inf
            move_all(tree, "", AGENT)          # whatever ran `exec` while no daemon watched
        entry.agent_id = tree.cgroup_id(AGENT)
        if monitor is not None:
            monitor.watch(entry.agent_id, stop_at_exec=True)
            self._stopping.update({entry.root_id: math.inf, entry.agent_id: math.inf})
        self.adopted[entry.name] = entry
        self._by_cgroup[entry.root_id] = entry
        self._by_cgroup[entry.agent_id] = entry

    def release(self, name: str, why: str) -> int:
        """End the sandbox's calls (their processes go back to the container), undo the
        nesting, forget the sandbox. Returns how many processes moved back."""
        entry = self.adopted.pop(name)
        d = self.d
        alive = entry.alive()
        for call in [c for c in d.calls.running() if c.sandbox == name]:
            if alive:
                try:
                    move_all(entry.tree, call.path.split("/", 1)[1], AGENT)
                except AgentcgError as exc:
                    log.warning("release %s: moving call %s back: %s", name, call.call_id, exc)
            call.extra["released"] = 1.0 if why == "released" else 0.0
            if why != "released":
                call.extra["container_exited"] = 1.0
            self._by_pid = {p: c for p, c in self._by_pid.items() if c != call.call_id}
            d.calls.returned(call)
            call.grace_s = 0.0
        d.finish_due()
        moved = 0
        if alive:
            moved = unnest(entry.tree, entry.nesting)
        else:
            try:
                unnest(entry.tree, entry.nesting)   # what the runtime did not remove yet
            except AgentcgError:
                pass
        for cgroup_id in (entry.root_id, entry.agent_id):
            self._by_cgroup.pop(cgroup_id, None)
            if d.monitor is not None and cgroup_id in d.monitor.watched():
                d.monitor.forget(cgroup_id)
            if cgroup_id in self._stopping:    # events already in the ring buffer still get their SIGCONT
                self._stopping[cgroup_id] = time.monotonic() + FORGOTTEN_KEPT_S
        d.tree.unmount(name)
        d._forget_sandbox(name)
        self.save()
        log.info("sandbox %s (container %s) %s; %d processes moved back", name, entry.container_id, why, moved)
        return moved

    # ---- restart ----------------------------------------------------------------------
    def restore(self) -> None:
        """Before the daemon's own adoption: re-adopt containers still running, and drop the
        sandboxes of those that exited from the daemon's state file (it must not recreate them)."""
        saved = self._load()
        gone: list[str] = []
        for data in saved:
            try:
                cg = ContainerCgroup.from_dict(data["cgroup"])
                entry = Adopted(str(data["name"]), cg, Nesting.from_dict(data.get("nesting", {})),
                                str(data.get("runtime", "unknown")), data.get("container_id"), data.get("init_pid"),
                                data.get("init_start_ticks"), data.get("memory_budget_bytes"),
                                str(data.get("budget_from", "none")),
                                tuple(data["tools"]) if data.get("tools") is not None else None,
                                tuple(data.get("exclude") or ()))
                entry.calls = {str(k): (int(v[0]), int(v[1])) for k, v in dict(data.get("calls") or {}).items()}
                entry.tree = container_tree(self.layout, cg, own_root=self.d.tree.root)
                if not entry.alive():
                    raise CgroupGone("its init process is gone")
                self._start(entry, fresh=False)
                self.d.tree.mount(entry.name, entry.tree)
                log.info("re-adopted container %s as sandbox %s", entry.container_id, entry.name)
            except (AgentcgError, KeyError, TypeError, ValueError) as exc:
                log.info("adopted container %s not re-adopted: %s", data.get("name"), exc)
                gone.append(str(data.get("name")))
        self._patch_daemon_state(gone)
        self.save()

    def _patch_daemon_state(self, gone: list[str]) -> None:
        """Before the daemon reads its state file: the sandboxes of exited containers go (it
        must not recreate them), and each running call of a re-adopted container gets its
        main process as owner, so the daemon's owner check ends it when that exits (while
        this daemon ran, the eBPF exit event did, with the exit status), and nothing is killed."""
        owners = {cid: owner for e in self.adopted.values() for cid, owner in e.calls.items()}
        if not gone and not owners:
            return
        path = self.d.config.state_path
        try:
            state = load_state(path)
        except InvalidInput:
            return
        for name in gone:
            state.sandboxes.pop(name, None)
        for call_id, (pid, ticks) in owners.items():
            entry = state.calls.get(call_id)
            if entry is not None and entry.owner_pid == 0:
                entry.owner_pid, entry.owner_start_ticks = pid, ticks
        save_state(path, state)

    def _load(self) -> list[dict[str, Any]]:
        return load_adopted(self.path)

    def save(self) -> None:
        running = {c.call_id for c in self.d.calls.running()} if self.d.calls is not None else set()
        for entry in self.adopted.values():
            entry.calls = {k: v for k, v in entry.calls.items() if k in running}
        save_adopted(self.path, self.adopted.values())

    # ---- the loop -----------------------------------------------------------------------
    def on_events(self, events: list[Any]) -> None:
        """Exec and exit events from the daemon's ring-buffer drain."""
        from agentcg.bpf.events import ExecEvent, ExitEvent

        if not self.adopted and not self._by_pid and not self._stopping:
            return

        for event in events:
            if isinstance(event, ExecEvent):
                entry = self._by_cgroup.get(event.cgroup_id)
                continued = False
                try:
                    if entry is not None:
                        continued = self._on_exec(entry, event)
                except Exception:   # a bug must not leave the command stopped
                    log.exception("container exec of %s in %s", event.filename, entry.name if entry else "?")
                finally:
                    if not continued and event.cgroup_id in self._stopping:
                        _continue(event)   # only what our stop_at_exec watches stopped
            elif isinstance(event, ExitEvent):
                call_id = self._by_pid.pop(event.pid, None)
                self._dead_since.pop(event.pid, None)
                if call_id is not None:
                    try:
                        call = self.d.calls.get(call_id)
                    except CgroupGone:
                        continue
                    self.d.end_call(call, event.exit_code, event.signal, waiter=None)

    def housekeeping(self, now: float) -> None:
        if now < self._next_check or not (self.adopted or self._by_pid or self._stopping):
            return
        self._next_check = now + ALIVE_CHECK_S
        for cgroup_id in [c for c, until in self._stopping.items() if until < now]:
            del self._stopping[cgroup_id]
        for pid, call_id in list(self._by_pid.items()):
            if PROC.is_alive(pid):
                continue
            since = self._dead_since.setdefault(pid, now)
            if now - since >= LOST_EXIT_S:       # its exit event was lost: status unknown
                self._by_pid.pop(pid, None)
                self._dead_since.pop(pid, None)
                try:
                    self.d.end_call(self.d.calls.get(call_id), None, None, waiter=None)
                except CgroupGone:
                    pass
        for name, entry in list(self.adopted.items()):
            if not entry.alive():
                self.release(name, "container exited")

    def _on_exec(self, entry: Adopted, event: Any) -> bool:
        """Handle one exec; True when the process was sent its SIGCONT already."""
        pid, filename = event.pid, event.filename
        base = os.path.basename(filename)
        if base.startswith(_RUNC_NAMES) or filename.startswith(("/proc/self/", "memfd:")):
            return False
        ppid = event.ppid or _ppid(pid)
        # From outside: its parent is not in the container (runc, for `podman exec`). A
        # process the container forked itself may still exec in the container's cgroup
        # while adoption moves the others: it is the agent's and joins agent/.
        from_outside = not self._inside(entry, ppid)
        if not from_outside and (pid == entry.init_pid or ppid == entry.init_pid) \
                and entry.matcher.matches(filename):
            return self._begin(entry, event, False)
        if from_outside:
            return self._begin(entry, event, True)
        if event.cgroup_id == entry.root_id:
            try:
                entry.tree.attach(AGENT, pid)
            except AgentcgError:
                pass   # exited meanwhile
        return False

    def _inside(self, entry: Adopted, pid: int | None) -> bool:
        """True when `pid` lives in the container's cgroup or below it."""
        if not pid:
            return False
        try:
            path = (PROC.v2_cgroup(pid) or "").strip("/")
        except AgentcgError:
            return False
        return path == entry.cgroup.v2 or path.startswith(entry.cgroup.v2 + "/")

    def _begin(self, entry: Adopted, event: Any, from_outside: bool) -> bool:
        """The exec becomes a call: cgroup, move, SIGCONT, then the bookkeeping (the
        command waits stopped only for what it must: its cgroup and the move)."""
        d, pid = self.d, event.pid
        if len(d.calls.running()) >= d.config.limits.max_running_calls:
            log.warning("%s: max_running_calls reached; %s runs untracked", entry.name, event.filename)
            return False
        tool = os.path.basename(event.filename) or event.comm or "unknown"
        call = d.calls.begin(entry.name, tool[:64], truncate_command(_command_of(pid, event.filename)),
                             create_sandbox=False)
        call.start_monotonic_s = event.monotonic_s
        call.start_wall_s = time.time() - (time.monotonic() - event.monotonic_s)
        source = "" if event.cgroup_id == entry.root_id else AGENT
        try:
            d.apply_call_limits(call)
            call.attach(pid)
            moved = True
        except (CgroupGone, AgentcgError):
            moved = False
        if moved:
            if d.monitor is not None:
                try:
                    d.monitor.watch_pid(pid, call.cgroup_id)
                except InvalidInput:
                    pass
            if not getattr(event, "stopped", False):   # it ran meanwhile, and may have forked
                self._move_children(entry, call, source, pid)
        host_pid, container_pid = ns_pids(pid)
        start_ticks = PROC.start_ticks(pid) if moved else None
        call.extra.update({"host_pid": host_pid, "container_pid": container_pid, "from_exec": 1 if from_outside else 0,
                           "detect_latency_s": time.monotonic() - event.monotonic_s})
        _continue(event)
        if entry.container_id:
            call.extra["container_id"] = entry.container_id[:12]   # type: ignore[assignment]
        d.state.calls[call.call_id] = CallEntry(
            call_id=call.call_id, sandbox=entry.name, tool=call.tool, command=call.command,
            start_monotonic_s=call.start_monotonic_s, start_wall_s=call.start_wall_s, grace_s=call.grace_s,
            # no owner for the daemon's owner check: its end comes from the eBPF exit event (with
            # the status), or from housekeeping when that event was lost; after a restart the
            # call is ended once its cgroup is empty
            owner_pid=0)
        d.save()
        d.engine_tool_began(call)
        if moved:
            self._by_pid[pid] = call.call_id
            self._dead_since.pop(pid, None)
            entry.calls[call.call_id] = (pid, start_ticks or 0)
            self.save()
        else:
            call.measured = False
            d.end_call(call, None, None, waiter=None)
        return True

    def _move_children(self, entry: Adopted, call: Any, source: str, pid: int) -> None:
        """What the command forked between its exec and the move is still in `source`."""
        family = {pid}
        for _ in range(8):
            try:
                pids = entry.tree.pids(source)
            except CgroupGone:
                return
            found = [p for p in pids if p != entry.init_pid and _ppid(p) in family]
            for p in found:
                try:
                    call.attach(p)
                    family.add(p)
                except AgentcgError:
                    pass
            if not found:
                return


def _ppid(pid: int) -> int | None:
    try:
        return PROC.stat(pid).ppid
    except AgentcgError:
        return None


def _continue(event: Any) -> None:
    if getattr(event, "stopped", False):
        try:
            os.kill(event.pid, signal.SIGCONT)
        except ProcessLookupError:
            pass
