"""Owners of running tool calls, watched through pidfds instead of polling /proc.

A pidfd polls readable once its process has exited (zombie or reaped), so the daemon
learns of an owner's death from one epoll set, whatever the number of calls: nothing is
read per call per tick. Calls of the same owner share one pidfd. The connection's pidfd
(SO_PEERPIDFD, taken at accept) is duplicated, so a recycled pid is never mistaken for
the owner; an owner adopted after a restart is opened with pidfd_open and then checked
against the start time the state recorded (a pid reused before the restart is dead).
"""
from __future__ import annotations

import logging
import os
import select

from agentcg.controller.daemon.adopt import adopt
from agentcg.controller.daemon.server import ProcFacts
from agentcg.errors import CgroupGone

log = logging.getLogger("agentcg.daemon")

UNKNOWN_CHECK_S = 1.0         # how often adopted calls with no owner are checked for emptiness


class OwnerWatch:
    def __init__(self) -> None:
        self._epoll = select.epoll()
        self._fd_of: dict[tuple[int, int], int] = {}        # (pid, start ticks) -> pidfd
        self._calls: dict[int, set[str]] = {}                # pidfd -> call ids
        self._owner_of: dict[str, int] = {}                  # call id -> pidfd
        self._key_of: dict[int, tuple[int, int]] = {}        # pidfd -> (pid, start ticks)

    def fileno(self) -> int:
        return self._epoll.fileno()

    def __len__(self) -> int:
        return len(self._owner_of)

    def watch(self, call_id: str, pid: int, start_ticks: int, pidfd: int = -1) -> bool:
        """Watch `call_id`'s owner; False when the owner is dead already (or unknowable)."""
        self.forget(call_id)
        key = (pid, start_ticks)
        fd = self._fd_of.get(key)
        if fd is None:
            fd = self._open(pid, start_ticks, pidfd)
            if fd < 0:
                return False
            self._fd_of[key], self._key_of[fd] = fd, key
            self._calls[fd] = set()
            self._epoll.register(fd, select.EPOLLIN)
        self._calls[fd].add(call_id)
        self._owner_of[call_id] = fd
        return True

    def forget(self, call_id: str) -> None:
        fd = self._owner_of.pop(call_id, None)
        if fd is None:
            return
        calls = self._calls.get(fd)
        if calls is not None:
            calls.discard(call_id)
            if not calls:
                self._close(fd)

    def dead(self) -> list[str]:
        """The calls whose owner exited since the last call (their watches are dropped)."""
        out: list[str] = []
        for fd, _ in self._epoll.poll(0):
            calls = self._calls.get(fd, set())
            out.extend(sorted(calls))
            for call_id in calls:
                self._owner_of.pop(call_id, None)
            self._close(fd)
        return out

    def close(self) -> None:
        for fd in list(self._calls):
            self._close(fd)
        self._owner_of.clear()
        self._epoll.close()

    def _open(self, pid: int, start_ticks: int, pidfd: int) -> int:
        if pidfd >= 0:
            return os.dup(pidfd)
        try:
            fd = os.pidfd_open(pid)
        except OSError:
            return -1
        facts = ProcFacts.read(pid)       # read after the open: the pidfd pins this process
        if facts is None or facts.start_ticks != start_ticks:
            os.close(fd)
            return -1
        return fd

    def _close(self, fd: int) -> None:
        self._calls.pop(fd, None)
        self._fd_of.pop(self._key_of.pop(fd, (0, 0)), None)
        try:
            self._epoll.unregister(fd)
        except (OSError, ValueError):
            pass
        os.close(fd)


class OwnedCalls:
    """A mixin of service.Daemon: calls adopted from an earlier daemon, owners that die,
    adopted calls nobody owns (recorded once their cgroup is empty)."""

    def _adopt(self, previous: tuple[int, int] | None = None) -> None:
        self.adoption = adopt(self.config, self.tree, self.calls, self.state, self.stats, self.apply_sandbox_limits,
                              spare=previous)
        assert self.owners is not None
        for entry in list(self.state.calls.values()):
            if entry.owner_pid == 0:       # found in the tree only: recorded once its processes are gone
                self._unknown.add(entry.call_id)
            elif entry.returned_monotonic_s is None and not self.owners.watch(
                    entry.call_id, entry.owner_pid, entry.owner_start_ticks):
                self._owner_died(entry.call_id)
        self.save()

    def _on_owner_exit(self, fd: int, mask: int) -> None:
        """An owner's pidfd turned readable: that process exited (or is a zombie)."""
        assert self.owners is not None
        for call_id in self.owners.dead():
            self._owner_died(call_id)

    def _owner_died(self, call_id: str) -> None:
        try:
            call = self.calls.get(call_id)
        except CgroupGone:
            return
        if call.has_returned:
            return
        entry = self.state.calls.get(call_id)
        log.info("owner %s of tool call %s died; the call ends after its grace period",
                 entry.owner_pid if entry else "?", call_id)
        self._cancel_admission(call)
        self.end_call(call, None, None, waiter=None)
        self.stats.observe_action("end", "owner_dead")

    def _check_unknown(self) -> None:
        """Adopted calls nobody owns end when their cgroup is empty (then they are recorded)."""
        for call_id in list(self._unknown):
            try:
                call = self.calls.get(call_id)
            except CgroupGone:
                self._unknown.discard(call_id)
                continue
            if call.has_returned:
                self._unknown.discard(call_id)
            elif not self.calls._populated(call):
                self._unknown.discard(call_id)
                self.calls.returned(call)
                call.grace_s = 0.0
