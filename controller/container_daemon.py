"""Containers as sandboxes in the daemon: `sandbox.adopt`, `sandbox.release`, and
re-adoption after a restart (docs/containers.md).

Adopting container C as sandbox S: C's cgroup becomes S (mounted into the daemon's
MountedTree), its processes move into S/agent, and both C's cgroup and S/agent are watched
by eBPF with stop_at_exec; what an exec there becomes is container_execs.py's.
`"container"` (an id or name) is resolved with `<runtime> inspect` off the daemon's loop
(container_inspect.py); the pid it names, or the one a client sends, is checked: the
container id the client (or the runtime) claims must be the one in that process's cgroup
path when the runtime names its cgroups by id (podman, docker).

State: `<state_dir>/containers.json` (rewritten whole with rename). A restarted daemon
re-adopts each container whose init still runs; nothing is killed. A container that
exited (init gone, or its cgroup removed by the runtime) is released on its own.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from agentcg.controller.autodetect import parse_globs
from agentcg.controller.cgroup.layout import CgroupLayout, detect_layout
from agentcg.controller.container import ContainerInfo, validate_container_ref
from agentcg.controller.container_cgroups import (
    ContainerCgroup, cgroups_of_pid, check_cgroup_path, classify, container_tree,
)
from agentcg.controller.container_execs import ContainerExecs, MonitorTap
from agentcg.controller.container_inspect import Inspections
from agentcg.controller.container_nest import AGENT, Nesting, make_leaf, move_all, nest, unnest
from agentcg.controller.container_state import (
    MAX_ADOPTED, PROC, STATE_FILE, Adopted, memory_limit, load_adopted, save_adopted,
)
from agentcg.controller.container_tree import MountedTree
from agentcg.controller.daemon.api import DEFERRED
from agentcg.controller.daemon.server import ApiError, encode_error, encode_result, error_code
from agentcg.controller.daemon.state import SandboxEntry, load_state, save_state
from agentcg.controller.sandbox import parse_priority, validate_name
from agentcg.errors import AgentcgError, CgroupGone, InvalidInput

log = logging.getLogger("agentcg.daemon.containers")

RUNTIMES = ("podman", "docker", "kubernetes", "systemd", "unknown")
_ID_NAMED = ("podman", "docker")     # runtimes whose cgroup paths carry the container id


class ContainerSandboxes:
    """The daemon's adopted containers. Runs in the daemon's loop thread only."""

    def __init__(self, daemon: Any, args: Any) -> None:
        """`daemon`: the Daemon (its tree, calls, state, api, monitor, config); `args`: the
        API's typed-argument reader (daemon.api.Args), passed in so that this module does
        not import the daemon's modules that import it back."""
        self.d = daemon
        self.args = args
        self.adopted: dict[str, Adopted] = {}
        self.execs = ContainerExecs(daemon, self.save)
        self.inspections = Inspections(daemon._register, daemon._unregister)
        self._layout: CgroupLayout | None = None

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
    def api_adopt(self, conn: Any, req: Any) -> Any:
        """The adopted sandbox's object; DEFERRED for a `container` (answered once its
        runtime's inspect is done, off the loop)."""
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
        if runtime is not None and runtime not in RUNTIMES:
            raise ApiError("invalid_input", f"{req.op}: runtime {runtime!r} unknown (podman, docker, kubernetes, ...)")
        if container_id is not None and (len(container_id) > 128 or not container_id.isprintable()):
            raise ApiError("invalid_input", f"{req.op}: container_id must be up to 128 printable characters")
        options = {"memory_budget_bytes": budget, "priority": priority, "tools": globs, "exclude": parse_globs(exclude)}
        if container is not None:
            self._check_free(name)       # fail now what would fail once inspected
            self.inspections.start(validate_container_ref(container), runtime,
                                   lambda info, error: self._inspected(conn, req.id, name, info, error, options))
            conn.busy = True             # answered by _inspected
            return DEFERRED
        entry = self.adopt(name, pid=pid, cgroup=cgroup, runtime=runtime, container_id=container_id, **options)
        return self.describe(entry)

    def _inspected(self, conn: Any, request_id: int | None, name: str, info: ContainerInfo | None,
                   error: AgentcgError | None, options: dict[str, Any]) -> None:
        """In the loop thread, once `<runtime> inspect` answered: adopt, then answer."""
        if conn.fileno() < 0:
            log.info("sandbox.adopt %s: the client went away while its container was inspected; nothing adopted",
                     name)
            return
        try:
            if error is not None:
                raise error
            assert info is not None
            entry = self.adopt(name, pid=info.pid, runtime=info.runtime, container_id=info.container_id, **options)
            answer = encode_result(request_id, self.describe(entry))
        except AgentcgError as exc:
            answer = encode_error(request_id, error_code(exc), str(exc))
        except Exception as exc:   # a bug must still answer the client
            log.exception("sandbox.adopt %s after inspect", name)
            answer = encode_error(request_id, "internal", f"internal error serving sandbox.adopt "
                                                          f"({type(exc).__name__}); see the daemon's log")
        self.d._answer(conn, answer)

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
        self._check_free(name)
        if pid is not None:
            cg = cgroups_of_pid(pid, self.layout)
        else:
            cg = self._cgroup_of_path(str(cgroup))
        kind = classify(cg.v2)
        _check_claim(cg, kind, pid, runtime, container_id)
        for other in self.adopted.values():
            mine, theirs = cg.v2 + "/", other.cgroup.v2 + "/"
            if mine.startswith(theirs) or theirs.startswith(mine):
                raise ApiError("exists", f"cgroup /{cg.v2} is (inside) the container adopted already as sandbox "
                                         f"{other.name!r} (/{other.cgroup.v2}); release it first")
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

    def _check_free(self, name: str) -> None:
        if name in self.d.state.sandboxes or self.d.tree.exists(name):
            raise ApiError("exists", f"sandbox {name!r} exists already; choose another name")
        if len(self.adopted) >= MAX_ADOPTED:
            raise ApiError("busy", f"{MAX_ADOPTED} containers are adopted already")

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
        tree = entry.tree
        entry.root_id = tree.cgroup_id("")
        if fresh:
            self.execs.watch_root(entry)      # watched before the move: an exec right after it is caught
            try:
                entry.nesting = nest(tree)
            except BaseException:
                self.execs.forget(entry)
                raise
        else:
            for leaf in (AGENT, "tools"):
                if make_leaf(tree, leaf) and leaf not in entry.nesting.made:
                    entry.nesting.made.append(leaf)
            self.execs.watch_root(entry)
            move_all(tree, "", AGENT)          # whatever ran `exec` while no daemon watched
        entry.agent_id = tree.cgroup_id(AGENT)
        self.execs.watch(entry)
        self.adopted[entry.name] = entry

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
            self.execs.forget_call(call.call_id)
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
        self.execs.forget(entry)    # events already in the ring buffer still get their SIGCONT
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
                entry = Adopted.from_dict(data)
                entry.tree = container_tree(self.layout, entry.cgroup, own_root=self.d.tree.root)
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
        """Exec and exit events from the daemon's ring-buffer drain (MonitorTap)."""
        self.execs.on_events(events)

    def housekeeping(self, now: float) -> None:
        if self.execs.housekeeping(now):
            for name, entry in list(self.adopted.items()):
                if not entry.alive():
                    self.release(name, "container exited")


def _check_claim(cg: ContainerCgroup, kind: Any, pid: int | None, runtime: str | None,
                 container_id: str | None) -> None:
    """The container id a client (or the runtime's inspect) names must be the one in the
    cgroup path of the process that stands for it, where the runtime names its cgroups by
    id: a wrong pid, or one reused since the inspect, is refused, not adopted under a
    false name. Other runtimes' labels are taken as given (the op is root's)."""
    if container_id is None or kind.ident is None or kind.runtime not in _ID_NAMED:
        return
    if runtime is not None and runtime in _ID_NAMED and runtime != kind.runtime:
        raise InvalidInput(f"pid {pid} is in a {kind.runtime} container's cgroup (/{cg.v2}), not {runtime}'s; "
                           "check the pid (`podman inspect` / `docker inspect` shows it)")
    if not (container_id.startswith(kind.ident) or kind.ident.startswith(container_id)):
        raise InvalidInput(f"pid {pid} is in container {kind.ident[:12]}'s cgroup (/{cg.v2}), not in "
                           f"{container_id[:12]}'s; check the pid (`{kind.runtime} inspect` shows it), or the "
                           "container restarted: adopt it again")
