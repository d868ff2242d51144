"""Exec watches that outlive the daemon (see exec_watch.py's module doc): the `Watch`
record, and `SavedWatches`, the part of ExecWatch that writes them to
`<state_dir>/exec_watches.json` and re-establishes them in the next daemon.
"""
from __future__ import annotations

import json
import logging
import os
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agentcg.controller.autodetect import ToolMatcher, _Tracked, parse_globs
from agentcg.controller.daemon.server import ApiError
from agentcg.controller.daemon.state import CallEntry
from agentcg.controller.sandbox import agent_path, validate_name
from agentcg.errors import AgentcgError
from agentcg.procfs import PROC

log = logging.getLogger("agentcg.daemon.exec_watch")
MAX_WATCHES = 64
WATCHES_FILE = "exec_watches.json"
WATCHES_VERSION = 1
MAX_WATCHES_BYTES = 1 << 20


@dataclass
class Watch:
    watch_id: int
    sandbox: str
    client_pid: int
    client_ticks: int | None
    created_sandbox: bool
    detector: Any       # a DaemonExecDetector (exec_watch.py), None without detection
    matcher: ToolMatcher = field(default_factory=ToolMatcher)
    grace_s: float | None = None
    detect: bool = True
    ending: bool = False
    result: dict[str, Any] = field(default_factory=dict)
    saved_agent_pid: int = 0

    def saved(self) -> dict[str, Any]:
        detector = self.detector
        agent_pid = detector.agent_pid if detector is not None else self.saved_agent_pid
        self.saved_agent_pid = agent_pid
        # the calls it made, so the next daemon drops the spares and names the moved ones
        spares = [c.call_id for c in detector._spares] if detector is not None else []
        moved = [{"call_id": t.call.call_id, "pid": t.pid, "tool": t.call.tool, "command": t.call.command,
                  "start_monotonic_s": t.call.start_monotonic_s, "start_wall_s": t.call.start_wall_s}
                 for t in detector._by_pid.values()] if detector is not None else []
        return {"watch_id": self.watch_id, "sandbox": self.sandbox, "client_pid": self.client_pid,
                "client_ticks": self.client_ticks, "created_sandbox": self.created_sandbox, "detect": self.detect,
                "tools": list(self.matcher.include), "exclude": list(self.matcher.exclude), "grace_s": self.grace_s,
                "agent_pid": agent_pid, "spares": spares, "moved": moved}


class SavedWatches:
    """Mixed into ExecWatch (its `watches`, `monitor`, `d`, `_detector`, `_ensure_sandbox`, `_guard`)."""

    watches: dict[int, Watch]
    monitor: Any
    d: Any
    _next_id: int
    _saved_text: str | None

    def _path(self) -> Path:
        return Path(self.d.config.daemon.state_dir) / WATCHES_FILE

    def _save(self) -> None:
        data = {"version": WATCHES_VERSION, "watches": [w.saved() for w in self.watches.values() if not w.ending]}
        text = json.dumps(data, sort_keys=True)
        if text == self._saved_text:
            return
        path = self._path()
        tmp = path.with_name(path.name + ".tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
            try:
                os.write(fd, text.encode())
            finally:
                os.close(fd)
            os.replace(tmp, path)
            self._saved_text = text
        except OSError as exc:     # the watch works; only a restart would lose it
            log.error("cannot save exec watches to %s (%s); a daemon restart ends them", path, exc.strerror or exc)

    def restore(self) -> int:
        """Start-up: re-establish the watches an earlier daemon saved; how many."""
        path = self._path()
        try:
            with open(path, "rb") as f:
                raw = f.read(MAX_WATCHES_BYTES + 1)
            data = json.loads(raw)
            if len(raw) > MAX_WATCHES_BYTES or data.get("version") != WATCHES_VERSION:
                raise ValueError(f"not version {WATCHES_VERSION} or over {MAX_WATCHES_BYTES} bytes")
            items = list(data["watches"])[:MAX_WATCHES]
        except FileNotFoundError:
            return 0
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            log.error("exec watches file %s is unreadable (%s); the agents it named are no longer watched", path, exc)
            items = []
        for item in items:
            try:
                self._restore_one(item)
            except (AgentcgError, ApiError, KeyError, TypeError, ValueError) as exc:
                log.error("cannot re-establish exec watch %r: %s", item.get("watch_id") if isinstance(item, dict)
                          else item, exc)
        self._next_id = max([self._next_id, *(w + 1 for w in self.watches)])
        self._save()
        if self.watches:
            log.info("re-established %d exec watch(es) of an earlier daemon", len(self.watches))
        return len(self.watches)

    def _restore_one(self, item: dict[str, Any]) -> None:
        watch_id, client_pid = int(item["watch_id"]), int(item["client_pid"])
        ticks = item.get("client_ticks")
        sandbox = validate_name(str(item["sandbox"]))
        matcher = ToolMatcher(parse_globs(list(item["tools"])), parse_globs(list(item["exclude"])))
        grace_s = None if item.get("grace_s") is None else float(item["grace_s"])
        agent_pid = int(item.get("agent_pid") or 0)
        alive = PROC.is_alive(client_pid, ticks)
        if sandbox not in self.d.state.sandboxes and not alive:
            return      # nothing left of it: no sandbox, no client
        self._ensure_sandbox(sandbox)
        detector = None
        if item.get("detect") and alive:
            detector = self._detector(sandbox, matcher, grace_s, client_pid, agent_pid)
        self._take_back_calls(item, detector)
        if detector is not None:
            _resume_stopped(self.d.tree, agent_path(sandbox))
        # a dead client's watch ends at the first housekeeping pass (and removes a sandbox it made)
        watch = Watch(watch_id, sandbox, client_pid, ticks, bool(item.get("created_sandbox")), detector, matcher,
                      grace_s, bool(item.get("detect")), saved_agent_pid=agent_pid)
        self.watches[watch_id] = watch

    def _take_back_calls(self, item: dict[str, Any], detector: Any) -> None:
        """The dead daemon's calls of this watch, adopted from the tree as "unknown" (so
        returned: they would be killed after their grace period): its empty spares go (no
        record); its moved commands get their tool, command and start back and, when the
        watch goes on, are tracked by the new detector until they exit."""
        d = self.d
        for call_id in item.get("spares") or []:
            call = _running(d, str(call_id))
            if call is not None and call.tool == "unknown" and not self._guard(d.tree.pids, call.path):
                self._guard(d.calls.discard, call)
                d.state.calls.pop(call.call_id, None)
        for moved in item.get("moved") or []:
            call = _running(d, str(moved["call_id"]))
            if call is None:
                continue
            call.tool, call.command = str(moved["tool"]), str(moved["command"])
            call.start_monotonic_s, call.start_wall_s = float(moved["start_monotonic_s"]), float(moved["start_wall_s"])
            d.calls.changed(call)
            if not self._guard(d.tree.is_populated, call.path):
                d.calls.returned(call)            # it exited while no daemon ran: status unknown
            elif detector is not None:
                d.calls.resumed(call)             # running again (the call index knows)
                pid = int(moved["pid"])
                detector._by_pid[pid] = _Tracked(call, pid, True)
                if call.cgroup_id not in self.monitor.watched():
                    self._guard(self.monitor.watch, call.cgroup_id)
                self._guard(self.monitor.watch_pid, pid, call.cgroup_id)
            entry = d.state.calls.get(call.call_id)
            if entry is not None:
                entry.tool, entry.command = call.tool, call.command
                entry.start_monotonic_s, entry.start_wall_s = call.start_monotonic_s, call.start_wall_s
                entry.returned_monotonic_s, entry.returned_wall_s = call.returned_monotonic_s, call.returned_wall_s
                entry.exit_code, entry.signal = call.exit_code, call.signal
                d.state.calls[call.call_id] = entry
        d.save()

    def _enter_calls(self) -> None:
        """Moved commands go into the daemon's state like toolcall.begin's calls (after
        they were resumed), owned by the watch's client: a restarted daemon adopts them
        instead of reaping them as calls of a dead owner (the earlier daemon)."""
        d, added = self.d, False
        for watch in self.watches.values():
            if watch.detector is None:
                continue
            for tracked in watch.detector._by_pid.values():
                call = tracked.call
                if not tracked.moved or call.call_id in d.state.calls:
                    continue
                d.state.calls[call.call_id] = CallEntry(
                    call_id=call.call_id, sandbox=call.sandbox, tool=call.tool, command=call.command,
                    start_monotonic_s=call.start_monotonic_s, start_wall_s=call.start_wall_s, priority=call.priority,
                    grace_s=call.grace_s, owner_pid=watch.client_pid, owner_start_ticks=watch.client_ticks or 0)
                added = True
        if added:
            d.save()


def _running(d: Any, call_id: str) -> Any:
    try:
        return d.calls.get(call_id)
    except AgentcgError:
        return None


def _resume_stopped(tree: Any, path: str) -> None:
    """SIGCONT the processes an earlier daemon's detector stopped at exec and never resumed."""
    try:
        pids = tree.pids(path)
    except AgentcgError:
        return
    for pid in pids:
        try:
            if PROC.stat(pid).state in ("T", "t"):
                sigcont(pid)
        except AgentcgError:
            pass


def sigcont(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGCONT)
    except ProcessLookupError:
        pass
