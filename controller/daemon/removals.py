"""Removing finished calls' cgroups off the daemon's loop (issue 13, throughput).

A finished call's record is written and its state entry dropped in the loop; what is left
(rmdir of its cgroup in every hierarchy, its owner file) is work nobody waits for. The
loop renames the owner file `<state>/calls/<id>.json` to `<id>.done` (one rename(2): the
call is finished, its cgroup is only waiting for removal) and stages the directories; at
the end of the turn, after the turn's state is saved, they are handed to a thread that
removes them and then the `.done` file. The thread runs no more Python than a loop
over rmdir(2) calls, which release the GIL, so it does not hold the loop back (a thread
doing the cgroup API's Python work did: the loop waited for the GIL after each syscall).

What a kill -9 leaves: empty cgroups with a `.done` file. reap_orphans() reads only
`.json` owner files, and the next daemon's adoption (`clear_done`) removes an empty cgroup
with a `.done` file that its saved state does not list, instead of adopting it as a call
of tool "unknown" and recording it a second time; a `.done` file whose cgroup is gone is
removed. A cgroup the thread cannot remove (EBUSY: still populated) goes back to the loop,
which removes it the ordinary way (CgroupTree.remove: kill, wait, retry).
"""
from __future__ import annotations

import collections
import logging
import os
import threading
from pathlib import Path
from typing import Any

from agentcg.controller.reaper import calls_dir, remove_owner
from agentcg.controller.sandbox import call_path

log = logging.getLogger("agentcg.daemon")

DONE_SUFFIX = ".done"


class Removals:
    """The queue and its thread (started on the first removal)."""

    def __init__(self, state: Path) -> None:
        self.calls_dir = str(calls_dir(state))
        self._queue: collections.deque[tuple[str, str, list[str]]] = collections.deque()
        self._staged: list[tuple[str, str, list[str]]] = []    # this loop turn's, not yet released
        self._cv = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._working = False
        self.failed: collections.deque[tuple[str, str]] = collections.deque()   # (sandbox, call id): the loop's
        self.removed = 0

    def queue(self, sandbox: str, call_id: str, directories: list[str]) -> bool:
        """Mark the call finished (its owner file becomes `.done`) and queue its cgroup's
        directories; False (nothing changed) when the owner file is not there to rename."""
        owner = f"{self.calls_dir}/{call_id}.json"
        try:
            os.rename(owner, owner[:-5] + DONE_SUFFIX)
        except OSError:
            return False
        if self._closed:
            self._remove(sandbox, call_id, directories)
        else:
            self._staged.append((sandbox, call_id, directories))
        return True

    def release(self) -> None:
        """Hand the staged removals to the thread: at the end of the loop's turn, after its
        state is saved (a call's cgroup goes only once the state no longer lists the call;
        a kill -9 before leaves the cgroup and its `.done`, which clear_done removes)."""
        if not self._staged:
            return
        with self._cv:
            self._queue.extend(self._staged)
            self._staged.clear()
            if self._thread is None and not self._closed:
                self._thread = threading.Thread(target=self._run, name="agentcg-removals", daemon=True)
                self._thread.start()
            self._cv.notify()

    def pending(self) -> int:
        return len(self._queue) + len(self._staged)

    def flush(self, timeout_s: float = 10.0) -> bool:
        """Wait until the queue is done (before a sandbox is removed: its tools dir must be
        empty of our queued cgroups); False on timeout."""
        self.release()
        with self._cv:
            return self._cv.wait_for(lambda: not self._queue and not self._working, timeout_s)

    def close(self) -> None:
        """Finish the queue (the thread's, then anything left here) and stop the thread."""
        self.release()
        with self._cv:
            self._closed = True
            self._cv.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join(30.0)
        while self._queue:
            self._remove(*self._queue.popleft())

    def _run(self) -> None:
        while True:
            with self._cv:
                self._working = False
                self._cv.notify_all()
                while not self._queue and not self._closed:
                    self._cv.wait()
                if not self._queue:
                    return
                item = self._queue.popleft()
                self._working = True
            self._remove(*item)

    def _remove(self, sandbox: str, call_id: str, directories: list[str]) -> None:
        for directory in directories:
            try:
                os.rmdir(directory)
            except FileNotFoundError:
                pass
            except OSError:            # populated after all, or a child: the loop's slow path
                self.failed.append((sandbox, call_id))
                return
        try:
            os.unlink(f"{self.calls_dir}/{call_id}{DONE_SUFFIX}")
        except FileNotFoundError:
            pass
        self.removed += 1


def finish_failed(removals: Removals, tree: Any, state: Path) -> None:
    """In the loop: remove the cgroups the thread could not, the ordinary way."""
    from agentcg.errors import AgentcgError, CgroupGone

    while removals.failed:
        sandbox, call_id = removals.failed.popleft()
        try:
            tree.remove(call_path(sandbox, call_id))
        except CgroupGone:
            pass
        except AgentcgError as exc:      # its .done file stays: the next daemon's start retries
            log.error("cannot remove finished tool call %s/%s: %s", sandbox, call_id, exc)
            continue
        (calls_dir(state) / f"{call_id}{DONE_SUFFIX}").unlink(missing_ok=True)


def clear_done(tree: Any, state: Path, plan: Any, saved: Any) -> int:
    """At adoption: remove the plan's empty cgroups of finished calls (a `.done` file: made
    only after the call's record was written, so even a call `saved` still lists, its
    state entry not yet written when the daemon died, is not adopted and recorded again),
    drop them from `plan.calls` and `saved`, and remove `.done` files whose cgroup is gone.
    Returns how many cgroups were removed."""
    from agentcg.errors import AgentcgError, CgroupGone

    directory = calls_dir(state)
    try:
        done = {name[:-len(DONE_SUFFIX)] for name in os.listdir(directory) if name.endswith(DONE_SUFFIX)}
    except FileNotFoundError:
        return 0
    if not done:
        return 0
    removed, keep = 0, []
    for entry in plan.calls:
        if entry.call_id not in done:
            keep.append(entry)
            continue
        path = call_path(entry.sandbox, entry.call_id)
        try:
            if tree.is_populated(path):      # something moved in after it finished: adopt it
                keep.append(entry)
                continue
            tree.remove(path)
        except CgroupGone:
            pass
        except AgentcgError as exc:
            log.warning("cannot remove finished tool call cgroup %s: %s", path, exc)
            keep.append(entry)
            continue
        saved.calls.pop(entry.call_id, None)
        removed += 1
    plan.calls = keep
    kept = {c.call_id for c in keep}
    for call_id in done - kept:
        (directory / f"{call_id}{DONE_SUFFIX}").unlink(missing_ok=True)
        remove_owner(call_id, state)     # a .json beside it (renamed back by hand): nothing owns it now
    return removed
