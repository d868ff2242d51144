"""Owner files of running tool calls, and reaping the calls whose owner died.

Every call has `<state>/calls/<call-id>.json` while it runs: who owns it (pid and that
pid's start time, so a recycled pid is not mistaken for the owner), where its cgroup is,
and whether the owner created the sandbox for it. An `agentcg run` killed by SIGKILL
leaves its file and its cgroup behind; the next `agentcg` start (or the daemon) calls
`reap_orphans()`, which kills and removes the cgroup, removes a sandbox the dead owner
created if nothing else uses it, and deletes the file.

Owner files are written with agentcg.safefile (never through a planted link, mode 0600)
and trusted only when they are regular files of root (or of this uid) that nobody else
may write: a forged file in a loose state directory is ignored, never acted on. A
zombie owner is dead. Calls owned by the daemon named in `<state>/daemon.lock` are left
for that daemon to adopt on its next start, even while it is down (a `kill -9` and a
restart lose nothing, and an `agentcg run` in between does not kill them).
"""
from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

from agentcg.controller.cgroup import CgroupTree
from agentcg.controller.sandbox import (
    call_path, remove_auto_sandbox_if_unused, sandbox_lock, state_dir, validate_name,
)
from agentcg.errors import AgentcgError, CgroupGone, InvalidInput
from agentcg.procfs import PROC, ZOMBIE_STATES

OWNER_VERSION = 1
MAX_OWNER_FILE_BYTES = 4096
MAX_REAPED_PER_PASS = 10_000

log = logging.getLogger("agentcg.reaper")


@dataclass(frozen=True)
class CallOwner:
    call_id: str
    sandbox: str
    root: str                   # the tree's root, e.g. "agentcg"
    owner_pid: int
    owner_start_ticks: int      # field 22 of /proc/<pid>/stat
    start_wall_s: float
    created_sandbox: bool       # informational; removal follows the sandbox's auto marker
    version: int = OWNER_VERSION


@dataclass(frozen=True)
class ReapedCall:
    call_id: str
    sandbox: str
    owner_pid: int
    cgroup_removed: bool
    sandbox_removed: bool


def calls_dir(state: Path | None = None) -> Path:
    return state_dir(state) / "calls"


def process_start_ticks(pid: int) -> int | None:
    """The start time of `pid` in clock ticks since boot, or None when it does not exist
    or is a zombie (an exited owner is dead whether or not its parent reaped it)."""
    try:
        stat = PROC.stat(pid)
    except AgentcgError:
        return None
    return None if stat.state in ZOMBIE_STATES else stat.start_ticks


def is_alive(owner: CallOwner) -> bool:
    """The owner runs: same pid, same start time, and not a zombie (a killed `agentcg run`
    whose parent has not reaped it yet will never end its call)."""
    return PROC.is_alive(owner.owner_pid, owner.owner_start_ticks)


DAEMON_LOCK = "daemon.lock"


def daemon_owner(state: Path | None = None) -> tuple[int, int] | None:
    """(pid, start ticks) of the daemon that last held this state directory, from its lock
    file; None when there is none or it is not a file root (or we) wrote."""
    from agentcg.safefile import read_private

    try:
        text = read_private(state_dir(state) / DAEMON_LOCK, 256).decode()
        pid, ticks = (int(x) for x in text.split())
    except (OSError, ValueError, UnicodeDecodeError, InvalidInput):
        return None
    return pid, ticks


def write_owner(owner: CallOwner, state: Path | None = None) -> Path:
    from agentcg.safefile import atomic_write, ensure_private_dir

    directory = ensure_private_dir(calls_dir(state), 0o700)
    path = directory / f"{validate_name(owner.call_id, 'call id')}.json"
    # a reader never sees half a file; a daemon crash, not a host crash, is what it survives
    # vars(), not asdict(): every field is a plain value, and asdict deep-copies (slow per call)
    atomic_write(path, json.dumps(vars(owner), sort_keys=True), 0o600, fsync=False)
    return path


def remove_owner(call_id: str, state: Path | None = None) -> None:
    try:
        (calls_dir(state) / f"{call_id}.json").unlink()
    except FileNotFoundError:
        pass


def read_owner(path: Path) -> CallOwner:
    from agentcg.safefile import read_private

    try:
        data = json.loads(read_private(path, MAX_OWNER_FILE_BYTES))   # UnsafePath: forged, not trusted
        owner = CallOwner(**data)
    except (OSError, ValueError, TypeError, RecursionError) as exc:
        raise InvalidInput(f"{path}: not an agentcg owner file ({exc}); delete it") from None
    validate_name(owner.call_id, "call id")
    validate_name(owner.sandbox)
    if owner.version != OWNER_VERSION:
        raise InvalidInput(f"{path}: owner file version {owner.version}, this agentcg reads {OWNER_VERSION}")
    return owner


def list_owners(state: Path | None = None) -> list[tuple[Path, CallOwner | None]]:
    directory = calls_dir(state)
    if not directory.is_dir() or directory.is_symlink():
        return []
    out: list[tuple[Path, CallOwner | None]] = []
    for path in sorted(directory.glob("*.json"))[:MAX_REAPED_PER_PASS]:
        try:
            out.append((path, read_owner(path)))
        except InvalidInput:
            out.append((path, None))
    return out


def reap_orphans(tree: CgroupTree, state: Path | None = None, *, timeout_s: float = 5.0,
                 spare: tuple[int, int] | None = None) -> list[ReapedCall]:
    """Kill and remove the cgroup of every call of `tree.root` whose owner is dead, except
    those of the daemon in `<state>/daemon.lock` and of the owner `spare` (pid, ticks)."""
    reaped = []
    daemon = daemon_owner(state)
    for path, owner in list_owners(state):
        if owner is None:   # unreadable or not trusted: never acted on
            log.warning("ignoring %s: not a trusted agentcg owner file (remove it)", path)
            continue
        if owner.root != tree.root or is_alive(owner) or (owner.owner_pid, owner.owner_start_ticks) in (daemon, spare):
            continue
        cgroup_removed = sandbox_removed = False
        try:
            if tree.exists(call_path(owner.sandbox, owner.call_id)):
                tree.remove(call_path(owner.sandbox, owner.call_id), timeout_s=timeout_s)
                cgroup_removed = True
            with sandbox_lock(tree, owner.sandbox, state):
                sandbox_removed = remove_auto_sandbox_if_unused(tree, owner.sandbox, state)
        except CgroupGone:
            pass
        except AgentcgError as exc:
            # one stuck cgroup (a process in D state, say) must not stop every later start:
            # its owner file stays, so the next pass tries again
            log.warning("cannot reap tool call %s/%s yet: %s", owner.sandbox, owner.call_id, exc)
            continue
        path.unlink(missing_ok=True)
        reaped.append(ReapedCall(owner.call_id, owner.sandbox, owner.owner_pid, cgroup_removed, sandbox_removed))
    return reaped
