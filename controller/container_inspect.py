"""`<runtime> inspect` for the daemon, off its loop: `sandbox.adopt {"container": ...}`.

The runtime's CLI can take seconds (podman reads its database, a busy dockerd answers late;
bounded by INSPECT_TIMEOUT_S), and the daemon's loop must not wait for it: each inspect
runs in a thread of its own, at most MAX_INSPECTS at once, and its answer comes back to
the loop thread through an eventfd the daemon's epoll watches. The callback then runs in
the loop thread, where all of the daemon's state lives. The thread only runs the CLI and
parses its JSON; it touches nothing of the daemon.
"""
from __future__ import annotations

import logging
import os
import select
import threading
from typing import Any, Callable

from agentcg.controller.container import ContainerInfo, inspect_container
from agentcg.controller.daemon.server import ApiError
from agentcg.errors import AgentcgError

log = logging.getLogger("agentcg.daemon.containers")

MAX_INSPECTS = 4            # runtime CLIs running at once for the daemon

Register = Callable[[int, int, Callable[[int, int], None]], None]   # the daemon's epoll: (fd, events, handler)
Done = Callable[["ContainerInfo | None", "AgentcgError | None"], None]


class Inspections:
    """The daemon's `<runtime> inspect` runs in flight."""

    def __init__(self, register: Register, unregister: Callable[[int], None]) -> None:
        self._register, self._unregister = register, unregister
        self.running = 0

    def start(self, ref: str, runtime: str | None, done: Done) -> None:
        """Inspect container `ref` in a thread; `done(info, error)` runs later in the
        loop thread, exactly once. ApiError `busy` when MAX_INSPECTS run already."""
        if self.running >= MAX_INSPECTS:
            raise ApiError("busy", f"{MAX_INSPECTS} container inspections are running; retry, or resolve the "
                                   "container on the client (`agentcg sandbox adopt --container` does) and send 'pid'")
        fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        box: dict[str, Any] = {}

        def work() -> None:
            try:
                box["info"] = inspect_container(ref, runtime)
            except AgentcgError as exc:
                box["error"] = exc
            except Exception as exc:   # a bug must still answer the client
                log.exception("inspecting container %s", ref)
                box["error"] = AgentcgError(f"inspecting container {ref!r} failed ({type(exc).__name__}); "
                                            "see the daemon's log")
            finally:
                os.eventfd_write(fd, 1)

        def ready(_fd: int, _mask: int) -> None:
            self._unregister(fd)
            os.close(fd)
            self.running -= 1
            done(box.get("info"), box.get("error"))

        self._register(fd, select.EPOLLIN, ready)
        try:
            threading.Thread(target=work, name=f"agentcg-inspect-{ref[:12]}", daemon=True).start()
        except BaseException:
            self._unregister(fd)
            os.close(fd)
            raise
        self.running += 1
