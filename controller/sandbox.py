"""The sandbox hierarchy below the agentcg root, on any CgroupTree:

    <root>/<sandbox>/agent             the agent's long-lived processes (a leaf)
    <root>/<sandbox>/tools/<call-id>   one leaf per tool call

Processes live only in leaves, so cgroup v2's no-internal-process rule holds and
controllers can be enabled on `<sandbox>` and `tools`. Creating and removing a sandbox
is serialised per sandbox with a lock file in the state directory, so two `agentcg run`
processes (or a run and the daemon) cannot remove a sandbox the other is starting a call in.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from agentcg.controller.cgroup import CgroupTree, validate_path
from agentcg.errors import AccessDenied, CgroupBusy, CgroupGone, InvalidInput
from agentcg.policies.sandbox.types import PRIORITY_CPU_WEIGHT  # the one table (re-exported here)

AGENT = "agent"
TOOLS = "tools"
DEFAULT_STATE_DIR = Path("/run/agentcg")
PRIORITIES = ("high", "normal", "low")
LOCK_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class SandboxInfo:
    name: str
    cgroup_id: int
    agent_pids: tuple[int, ...]
    calls: tuple[str, ...]          # call ids with a cgroup below tools/


def state_dir(path: str | os.PathLike | None = None) -> Path:
    """The state directory: `path`, else $AGENTCG_STATE_DIR, else /run/agentcg."""
    if path is None:
        path = os.environ.get("AGENTCG_STATE_DIR") or DEFAULT_STATE_DIR
    return Path(path)


def validate_name(name: object, what: str = "sandbox") -> str:
    """One cgroup path segment: 1..64 of [A-Za-z0-9_.-], not '.', '..'; InvalidInput otherwise."""
    if not isinstance(name, str) or not name:
        raise InvalidInput(f"{what} name is empty; use 1..64 characters of A-Z a-z 0-9 _ . -")
    if "/" in name:
        raise InvalidInput(f"{what} name {name!r} contains '/'; a {what} is one level, e.g. 'sb1'")
    try:
        validate_path(name, allow_root=False)
    except InvalidInput:
        raise InvalidInput(
            f"bad {what} name {name!r}: use 1..64 characters of A-Z a-z 0-9 _ . - (not '.' or '..')"
        ) from None
    return name


def parse_priority(text: object) -> str:
    if text not in PRIORITIES:
        raise InvalidInput(f"priority must be one of {', '.join(PRIORITIES)}, got {text!r}")
    return str(text)


def agent_path(sandbox: str) -> str:
    return f"{sandbox}/{AGENT}"


def tools_path(sandbox: str) -> str:
    return f"{sandbox}/{TOOLS}"


def call_path(sandbox: str, call_id: str) -> str:
    return f"{sandbox}/{TOOLS}/{call_id}"


def hierarchies(tree: CgroupTree) -> list[str]:
    """"v2" plus, on a hybrid host, one v1 controller per distinct v1 mount."""
    names = ["v2"]
    seen: set[Path] = set()
    for controller, mount in sorted(getattr(tree, "v1_mounts", {}).items()):
        if mount not in seen:
            seen.add(mount)
            names.append(controller)
    return names


def procs_files(tree: CgroupTree, path: str) -> list[Path]:
    """The cgroup.procs file of `path` in every hierarchy a process must join."""
    return [tree.cgroup_dir(path, h) / "cgroup.procs" for h in hierarchies(tree)]


@contextlib.contextmanager
def sandbox_lock(tree: CgroupTree, sandbox: str, state: Path | None = None) -> Iterator[None]:
    """An exclusive flock on <state>/locks/<root>.<sandbox>.lock (bounded wait).

    The file is opened without following links and trusted only when it is ours
    (agentcg.safefile.open_private), and removed on release once the sandbox is gone, so
    lock files do not pile up per name ever used. A waiter that got the lock on a file
    unlinked meanwhile sees that the path no longer names its file and opens it again."""
    import time

    from agentcg.safefile import ensure_private_dir, open_private

    directory = ensure_private_dir(state_dir(state) / "locks", 0o700)
    path = directory / f"{tree.root.replace('/', '.')}.{validate_name(sandbox)}.lock"
    deadline = time.monotonic() + LOCK_TIMEOUT_S
    while True:
        fd = open_private(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        raise CgroupBusy(f"sandbox {sandbox!r}: lock {path} held for more than {LOCK_TIMEOUT_S} s "
                                         "by another agentcg process") from None
                    time.sleep(0.002)
            try:
                current = os.stat(path, follow_symlinks=False).st_ino
            except FileNotFoundError:
                current = None
        except BaseException:
            os.close(fd)
            raise
        if current == os.fstat(fd).st_ino:
            break
        os.close(fd)                 # the holder removed it with its sandbox: take the new one
    try:
        yield
    finally:
        try:
            if not tree.exists(sandbox):
                path.unlink(missing_ok=True)      # still holding it: waiters retry (above)
        finally:
            os.close(fd)


def _auto_marker(tree: CgroupTree, sandbox: str, state: Path | None) -> Path:
    return state_dir(state) / "auto" / f"{tree.root.replace('/', '.')}.{validate_name(sandbox)}"


def mark_auto_created(tree: CgroupTree, sandbox: str, state: Path | None = None) -> None:
    """Remember that a tool call created this sandbox: the last call to end removes it."""
    from agentcg.safefile import ensure_private_dir, open_private

    marker = _auto_marker(tree, sandbox, state)
    ensure_private_dir(marker.parent, 0o700)
    os.close(open_private(marker, os.O_WRONLY | os.O_CREAT, 0o600))


def auto_created(tree: CgroupTree, sandbox: str, state: Path | None = None) -> bool:
    """True while the sandbox carries the marker of a tool call that created it."""
    return _auto_marker(tree, sandbox, state).exists()


def clear_auto_created(tree: CgroupTree, sandbox: str, state: Path | None = None) -> None:
    _auto_marker(tree, sandbox, state).unlink(missing_ok=True)


def remove_auto_sandbox_if_unused(tree: CgroupTree, sandbox: str, state: Path | None = None) -> bool:
    """Remove a sandbox that a tool call created once nothing uses it. Hold `sandbox_lock`."""
    marker = _auto_marker(tree, sandbox, state)
    if not marker.exists():
        return False
    removed = remove_sandbox_if_unused(tree, sandbox)
    if removed or not tree.exists(sandbox):
        marker.unlink(missing_ok=True)
    return removed


def sandbox_exists(tree: CgroupTree, sandbox: str) -> bool:
    return tree.exists(validate_name(sandbox))


def ensure_sandbox(tree: CgroupTree, sandbox: str, priority: str | None = None) -> bool:
    """Create <sandbox>/agent and <sandbox>/tools if missing; True when the sandbox is new.
    `priority` sets the sandbox's CPU weight (None leaves it as it is)."""
    validate_name(sandbox)
    created = not tree.exists(sandbox)
    tree.create(agent_path(sandbox), exist_ok=True)
    tree.create(tools_path(sandbox), exist_ok=True)
    if priority is not None:
        set_priority(tree, sandbox, parse_priority(priority))
    return created


def set_priority(tree: CgroupTree, path: str, priority: str) -> None:
    """CPU weight from the priority, where the host has a cpu controller for the tree."""
    if "cpu.weight" in tree.capabilities:
        tree.set_cpu(path, weight=PRIORITY_CPU_WEIGHT[parse_priority(priority)])


def sandbox_in_use(tree: CgroupTree, sandbox: str) -> bool:
    """True while the agent cgroup holds a process or any tool-call cgroup exists."""
    try:
        if tree.is_populated(validate_name(sandbox)):
            return True
        return bool(tree.children(tools_path(sandbox))) if tree.exists(tools_path(sandbox)) else False
    except CgroupGone:
        return False


def remove_sandbox_if_unused(tree: CgroupTree, sandbox: str) -> bool:
    """rmdir tools, agent and the sandbox, one directory at a time and never killing
    anything: a busy directory (a process, or a call another process just created) keeps
    the sandbox. True when it is gone. Call with `sandbox_lock` held."""
    validate_name(sandbox)
    if not tree.exists(sandbox) or sandbox_in_use(tree, sandbox):
        return False
    for path in (tools_path(sandbox), agent_path(sandbox), sandbox):
        for hierarchy in hierarchies(tree):
            directory = tree.cgroup_dir(path, hierarchy)
            try:
                os.rmdir(directory)
            except FileNotFoundError:
                continue
            except OSError as exc:
                if exc.errno in (errno.EBUSY, errno.ENOTEMPTY):
                    return False
                if exc.errno in (errno.EPERM, errno.EACCES):
                    raise AccessDenied(f"rmdir {directory}: {exc.strerror}; run as root") from None
                raise
    return True


def remove_sandbox(tree: CgroupTree, sandbox: str, timeout_s: float = 5.0) -> None:
    """Kill the agent and every tool call of `sandbox`, then remove its cgroups."""
    if not tree.exists(validate_name(sandbox)):
        raise CgroupGone(f"no sandbox {sandbox!r} below {tree.root}; `agentcg sandbox list` shows them")
    tree.remove(sandbox, timeout_s=timeout_s)


def list_sandboxes(tree: CgroupTree) -> list[SandboxInfo]:
    out = []
    if not tree.exists(""):
        return out
    for name in tree.children(""):
        try:
            agent = tuple(tree.pids(agent_path(name))) if tree.exists(agent_path(name)) else ()
            calls = tuple(tree.children(tools_path(name))) if tree.exists(tools_path(name)) else ()
            out.append(SandboxInfo(name, tree.cgroup_id(name), agent, calls))
        except CgroupGone:
            continue
    return out
