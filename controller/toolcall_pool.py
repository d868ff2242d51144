"""Work a tool call needs but its caller need not wait for: spare call cgroups made ahead
(mkdir in every hierarchy, the owner file, the cgroup.procs fds the exec helper joins
through), and the removal of a finished call's cgroup once its record is written.

    pool = CallPool(manager, size=2)     # ToolCallManager(..., pool_size=2) makes it
    spare = pool.take("sb1")             # None the first time: begin makes its own cgroup
    pool.defer(Removal(...))             # after the record: rmdir, owner file, auto sandbox
    pool.close()                         # spares and queued removals gone, thread stopped

One background thread does both. A spare is named with the call id it will carry (cgroup
v2 cannot rename a cgroup), so taking one changes nothing on disk: its owner file, written
when it was made, already names this process as owner. A spare is never reused after a
call: every call gets a cgroup nobody ran in (`take` checks it is still empty), so two
calls' accounting never mixes. Spares are only kept for sandboxes that outlive their
calls (not ones a call auto-created, whose last call removes them).

What a kill -9 leaves (spares, queued removals) all has owner files of the dead process:
the next agentcg start's `reap_orphans()` removes it, as it does a killed call. Spares are
never calls: they are in no manager's running list, so nothing records, counts or shows them.
"""
from __future__ import annotations

import collections
import logging
import os
import secrets
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agentcg.controller.cgroup import _fs
from agentcg.controller.cgroup.parked import Parked
from agentcg.controller.cgroup.spawner import helper_path
from agentcg.controller.reaper import CallOwner, remove_owner, write_owner
from agentcg.controller.sandbox import (
    auto_created, call_path, procs_files, remove_auto_sandbox_if_unused, sandbox_lock, tools_path,
)
from agentcg.errors import AgentcgError, CgroupGone

log = logging.getLogger("agentcg.toolcall")

DEFAULT_POOL_SIZE = 2
SETTLE_S = 0.005     # background work starts this long after the caller's last take or end


def new_call_id() -> str:
    return f"tc-{secrets.token_hex(6)}"


@dataclass
class Spare:
    call_id: str
    sandbox: str
    path: str
    cgroup_id: int
    procs_files: list[Path]
    join_fds: list[int] = field(default_factory=list)   # O_CLOEXEC fds on procs_files, same order
    made_wall_s: float = 0.0
    parked: Parked | None = None                         # the helper that joined it, waiting to exec


@dataclass(frozen=True)
class Removal:
    sandbox: str
    call_id: str
    path: str
    join_fds: tuple[int, ...] = ()
    parked: Parked | None = None


class CallPool:
    """Spares per sandbox and a removal queue for one ToolCallManager (`manager`: its tree,
    state directory and owner ticks are used; typed Any, as toolcall.py imports this module)."""

    def __init__(self, manager: Any, size: int = DEFAULT_POOL_SIZE) -> None:
        self.manager, self.size = manager, max(0, int(size))
        self._spares: dict[str, collections.deque[Spare]] = {}
        self._removals: collections.deque[Removal] = collections.deque()
        self._cv = threading.Condition()
        self._busy = False
        self._closed = False
        self._flushing = 0
        self._seen: set[str] = set()     # sandboxes that had a call: the second one starts the spares
        self._caller_at = 0.0            # monotonic time of the caller's last take/defer
        self._thread: threading.Thread | None = None
        self.background_s = 0.0          # CPU time the thread spent working (bench output)
        self.made = self.removed = 0

    # ---- the caller's side (cheap: no syscall but one read of cgroup.events) ----------
    def take(self, sandbox: str) -> Spare | None:
        """A clean spare cgroup of `sandbox`, or None (none made yet); asks for a refill."""
        with self._cv:
            if sandbox not in self._seen:
                # the first call of a sandbox makes its own cgroup and asks for no spares: a
                # one-call process (`agentcg run`) would only make spares to remove them at exit
                self._seen.add(sandbox)
                return None
            spares = self._spares.setdefault(sandbox, collections.deque())
            spare = spares.popleft() if spares else None
            self._caller_at = time.monotonic()
            if not spares:
                # out of spares: refill now. Otherwise the refill waits for the next removal
                # (the end of a call), so it never competes with this call's spawn for the CPU
                self._wake()
        if spare is None:
            return None
        try:
            if spare.parked is not None:   # nothing in it but our parked helper, still waiting
                clean = spare.parked.alive() and self.manager.tree.pids(spare.path) == [spare.parked.proc.pid]
            else:
                clean = not self.manager.tree.is_populated(spare.path)
        except AgentcgError:
            clean = False
        if not clean:   # something ran in it, or it was removed: never hand it to a call
            self.defer(_removal(spare))
            return None
        return spare

    def defer(self, removal: Removal) -> None:
        with self._cv:
            if self._closed:
                self._remove(removal)
                return
            self._removals.append(removal)
            self._caller_at = time.monotonic()
            self._wake()

    def flush(self, timeout_s: float = 10.0) -> bool:
        """Wait until queued removals and refills are done; False on timeout."""
        deadline = time.monotonic() + timeout_s
        with self._cv:
            self._flushing += 1
            try:
                self._wake()
                while self._removals or self._busy or self._wants_refill():
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        return False
                    self._cv.wait(remaining)
            finally:
                self._flushing -= 1
        return True

    def spares(self) -> list[Spare]:
        with self._cv:
            return [s for q in self._spares.values() for s in q]

    def close(self) -> None:
        """Stop the thread, finish queued removals and remove every spare (cgroup, owner file)."""
        with self._cv:
            self._closed = True
            self._cv.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join()
        with self._cv:
            removals = list(self._removals) + [_removal(s) for q in self._spares.values() for s in q]
            self._removals.clear()
            self._spares.clear()
        for removal in removals:
            self._remove(removal)

    # ---- the thread ---------------------------------------------------------------------
    def _wake(self) -> None:   # holding self._cv
        if self._thread is None and not self._closed:
            self._thread = threading.Thread(target=self._run, name="agentcg-callpool", daemon=True)
            self._thread.start()
        self._cv.notify_all()

    def _wants_refill(self) -> bool:   # holding self._cv
        return self.size > 0 and any(len(q) < self.size for q in self._spares.values())

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._closed and not self._removals and not self._wants_refill():
                    self._busy = False
                    self._cv.notify_all()
                    self._cv.wait()
                if self._closed:
                    self._busy = False
                    self._cv.notify_all()
                    return
                quiet_s = self._caller_at + SETTLE_S - time.monotonic()
                if quiet_s > 0 and not self._flushing:
                    # the caller is still busy right after its call (reading the record, its next
                    # step): this thread would take the GIL and a CPU from it; start a little later
                    self._busy = True
                    self._cv.wait(quiet_s)
                    continue
                self._busy = True
                removal = self._removals.popleft() if self._removals else None
                refill = None if removal is not None else next(
                    (sb for sb, q in self._spares.items() if len(q) < self.size), None)
            started = time.thread_time()
            if removal is not None:
                self._remove(removal)
                self.removed += 1
            elif refill is not None:
                spare = self._make(refill)
                with self._cv:
                    if spare is None:
                        self._spares.pop(refill, None)   # not poolable now; the next take asks again
                    elif self._closed:
                        self._removals.append(_removal(spare))
                    else:
                        self._spares.setdefault(refill, collections.deque()).append(spare)
                        self.made += 1
            self.background_s += time.thread_time() - started

    def _make(self, sandbox: str) -> Spare | None:
        mgr = self.manager
        call_id = new_call_id()
        path = call_path(sandbox, call_id)
        try:
            with sandbox_lock(mgr.tree, sandbox, mgr.state):
                # only sandboxes that outlive their calls: an auto-created one goes with its last call
                if not mgr.tree.exists(tools_path(sandbox)) or auto_created(mgr.tree, sandbox, mgr.state):
                    return None
                mgr.tree.create(path)
            made = time.time()
            try:
                write_owner(CallOwner(call_id, sandbox, mgr.tree.root, os.getpid(), mgr._owner_ticks, made, False),
                            mgr.state)
                files = procs_files(mgr.tree, path)
                spare = Spare(call_id, sandbox, path, mgr.tree.cgroup_id(path), files, made_wall_s=made)
                for procs in files:
                    spare.join_fds.append(_fs.open_procs(procs))
            except BaseException:
                self._remove(Removal(sandbox, call_id, path))
                raise
            if helper_path() is not None:
                try:
                    spare.parked = Parked.start(spare.join_fds)
                except (AgentcgError, OSError) as exc:   # still a spare: spawns join the ordinary way
                    log.warning("cannot park a helper in %s: %s", path, exc)
            return spare
        except AgentcgError as exc:
            log.warning("cannot make a spare tool-call cgroup in %s: %s", sandbox, exc)
            return None

    def _remove(self, removal: Removal) -> None:
        """The deferred half of ToolCallManager._discard."""
        mgr = self.manager
        if removal.parked is not None:
            removal.parked.release()
        for fd in removal.join_fds:
            try:
                os.close(fd)
            except OSError:
                pass
        try:
            try:
                mgr.tree.remove(removal.path)
            except CgroupGone:
                pass
            finally:
                remove_owner(removal.call_id, mgr.state)
            if auto_created(mgr.tree, removal.sandbox, mgr.state):   # as ToolCallManager._discard
                with sandbox_lock(mgr.tree, removal.sandbox, mgr.state):
                    remove_auto_sandbox_if_unused(mgr.tree, removal.sandbox, mgr.state)
        except AgentcgError as exc:   # its owner file stays (if the rmdir failed): reap_orphans retries
            log.error("cannot remove tool-call cgroup %s: %s", removal.path, exc)


def _removal(spare: Spare) -> Removal:
    return Removal(spare.sandbox, spare.call_id, spare.path, tuple(spare.join_fds), spare.parked)
