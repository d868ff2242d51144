"""What a daemon takes before it changes anything (a mixin of service.Daemon): the state
directory's lock, the cgroup root's lock and the API socket, in that order, so a second
daemon on the same state directory, root or socket refuses before touching anything; then
its own protection (oom_score_adj, SCHED_FIFO when configured).
"""
from __future__ import annotations

import fcntl
import logging
import os
from pathlib import Path

from agentcg.controller.cgroup import open_tree
from agentcg.controller.daemon.config import resolve_group
from agentcg.controller.daemon.server import UnixListener
from agentcg.controller.reaper import DAEMON_LOCK, daemon_owner, process_start_ticks
from agentcg.errors import InvalidInput

log = logging.getLogger("agentcg.daemon")

ROOT_LOCK_DIR = Path("/run/agentcg-roots")   # one lock per cgroup root, whatever the state dir


class DaemonClaims:
    def _claim(self) -> tuple[int, int] | None:
        """Take the state directory, the cgroup root and the socket, in that order, before
        anything is changed; refuse (InvalidInput, exit 2) when another daemon holds one.
        Returns the (pid, start ticks) of the daemon that held the state directory before."""
        from agentcg.safefile import ensure_private_dir, open_private

        cfg = self.config
        state_dir = ensure_private_dir(cfg.daemon.state_dir, 0o755)
        previous = daemon_owner(state_dir)
        fd = open_private(state_dir / DAEMON_LOCK, os.O_RDWR | os.O_CREAT, 0o600)
        self._locks.append(fd)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = f"pid {previous[0]}" if previous else "another process"
            raise InvalidInput(f"another agentcg daemon ({holder}) uses state directory {state_dir}; "
                               "stop it first, or give this one its own [daemon] state_dir") from None
        self.tree = open_tree(root=cfg.daemon.cgroup_root)
        self._lock_cgroup_root()
        gid = resolve_group(cfg.daemon.socket_group) if cfg.daemon.socket_group is not None else None
        self._listener = UnixListener(cfg.daemon.socket_path, cfg.daemon.socket_mode, gid)
        # ours now: say so in the lock file (reap_orphans spares this daemon's calls)
        ticks = process_start_ticks(os.getpid()) or 0
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {ticks}\n".encode(), 0)
        return previous

    def _lock_cgroup_root(self) -> None:
        """flock a lock file per cgroup root in ROOT_LOCK_DIR, the same for every state
        directory: whatever state directory a daemon uses, two cannot manage the same root.
        The file goes at shutdown; a daemon that locked a file unlinked meanwhile sees that
        the path names another file now, and takes that one instead."""
        from agentcg.safefile import ensure_private_dir, open_private

        path = ensure_private_dir(ROOT_LOCK_DIR, 0o755) / f"{self.tree.root.replace('/', '.')}.lock"
        for _ in range(8):
            fd = open_private(path, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise InvalidInput(f"another agentcg daemon manages cgroup root {self.tree.root!r} (it holds "
                                   f"{path}); stop it first, or give this one its own [daemon] cgroup_root") from None
            try:
                same = os.stat(path, follow_symlinks=False).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                self._locks.append(fd)
                self._root_lock_path = path
                return
            os.close(fd)
        raise InvalidInput(f"{path} keeps being replaced; is another daemon starting and stopping?")

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
