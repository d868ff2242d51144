"""Signals (a mixin of service.Daemon): SIGTERM and SIGINT stop the daemon cleanly through a
self-pipe in its epoll loop; the signals whose default would end it but that no daemon
should die of are noted and logged, never obeyed (docs/daemon.md, "Restart safety").
"""
from __future__ import annotations

import logging
import os
import resource
import select
import signal
import time
from typing import Any

# default action "terminate" but nothing a daemon should die of (signal(7)); SIGTERM and
# SIGINT stop it cleanly, SIGKILL and the core-dumping faults stay as they are
IGNORED_SIGNALS = tuple(getattr(signal, name) for name in (
    "SIGHUP", "SIGUSR1", "SIGUSR2", "SIGALRM", "SIGVTALRM", "SIGPROF", "SIGIO", "SIGPWR", "SIGPIPE",
    "SIGTTIN", "SIGTTOU", "SIGTSTP", "SIGXFSZ", "SIGSTKFLT") if hasattr(signal, name))


class DaemonSignals:
    def _install_signals(self) -> None:
        if self._epoll is None:
            self._epoll = select.epoll()
        self._raise_fd_limit()
        r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._signal_pipe = (r, w)
        signal.set_wakeup_fd(w, warn_on_full_buffer=False)
        for signum in (signal.SIGTERM, signal.SIGINT):
            self._old_signals[signum] = signal.signal(signum, self.request_stop)
        for signum in IGNORED_SIGNALS:
            # a handler, not SIG_IGN: exec() resets it, so no child inherits an ignored signal
            self._old_signals[signum] = signal.signal(signum, self._note_ignored)
        self._register(r, select.EPOLLIN, self._on_signal)

    def _note_ignored(self, signum: int, frame: Any) -> None:
        if len(self._ignored) < 64:
            self._ignored.append(signum)

    @staticmethod
    def _raise_fd_limit() -> None:
        """Each running call's owner is watched through a pidfd: up to the hard limit."""
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft != resource.RLIM_INFINITY and (hard == resource.RLIM_INFINITY or soft < hard):
            try:
                resource.setrlimit(resource.RLIMIT_NOFILE, (hard if hard != resource.RLIM_INFINITY
                                                            else max(soft, 1 << 20), hard))
            except (ValueError, OSError):
                pass

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
        ignored, self._ignored = self._ignored, []
        for signum in sorted(set(ignored)):
            self._bad_requests.log(logging.INFO, ("signal", signum),
                                   "%s ignored (docs/daemon.md, \"Restart safety\"); SIGTERM stops the daemon, "
                                   "and a restart keeps every running call", signal.Signals(signum).name,
                                   now=time.monotonic())
