"""The daemon's state journal (controller/daemon/state.py) and owner watch (owners.py), on
real files and real processes."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agentcg.controller.daemon.owners import OwnerWatch
from agentcg.controller.daemon.state import (
    COMPACT_MIN_LINES, CallEntry, DaemonState, SandboxEntry, journal_path, load_state, save_state,
)
from agentcg.errors import InvalidInput
from agentcg.procfs import PROC
from testutil import wait_until


def _call(i: int | str, sandbox: str = "S") -> CallEntry:
    return CallEntry(call_id=i if isinstance(i, str) else f"tc-{i:012x}", sandbox=sandbox, tool="t", command="cmd --flag", start_monotonic_s=1.0,
                     start_wall_s=2.0, owner_pid=100 + (i if isinstance(i, int) else 0), owner_start_ticks=7)


def _fresh(path: Path, calls: int) -> DaemonState:
    state = DaemonState()
    state.sandboxes["S"] = SandboxEntry("S", memory_budget_bytes=1 << 30)
    for i in range(calls):
        state.calls[f"tc-{i:012x}"] = _call(i)
    save_state(path, state)
    return state


def test_one_change_appends_one_line_whatever_the_number_of_calls(tmp_path: Path) -> None:
    sizes = {}
    for calls in (10, 2000):
        path = tmp_path / f"{calls}" / "state.json"
        state = _fresh(path, calls)
        assert journal_path(path).stat().st_size == 0
        state.calls["tc-new"] = _call("tc-new")
        save_state(path, state)
        del state.calls["tc-000000000001"]
        save_state(path, state)
        lines = journal_path(path).read_bytes().splitlines()
        assert len(lines) == 2
        sizes[calls] = journal_path(path).stat().st_size
        loaded = load_state(path)
        assert set(loaded.calls) == set(state.calls) and loaded.calls["tc-new"] == state.calls["tc-new"]
        assert loaded.sandboxes == state.sandboxes
    assert sizes[10] == sizes[2000]          # bytes written per change do not grow with the calls


def test_an_entry_changed_in_place_is_saved_once_assigned_again(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    state = _fresh(path, 3)
    entry = state.calls["tc-000000000000"]
    entry.exit_code = 3
    state.calls[entry.call_id] = entry
    save_state(path, state)
    assert load_state(path).calls["tc-000000000000"].exit_code == 3


def test_the_journal_is_compacted_and_replay_is_idempotent(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    state = _fresh(path, 0)
    for i in range(COMPACT_MIN_LINES + 10):       # churn: begin and end
        state.calls["tc-x"] = _call("tc-x")
        save_state(path, state)
        del state.calls["tc-x"]
        save_state(path, state)
    assert len(journal_path(path).read_bytes().splitlines()) < COMPACT_MIN_LINES
    # a crash after the snapshot was written but before the journal was emptied
    journal = journal_path(path).read_bytes()
    state.calls["tc-y"] = _call("tc-y")
    save_state(path, state)
    state.journal.compact(state)
    journal_path(path).write_bytes(journal + b'{"op":"call","value":{"call_id"')   # a torn last line
    loaded = load_state(path)
    assert set(loaded.calls) == {"tc-y"} and set(loaded.sandboxes) == {"S"}


def test_a_bad_journal_line_is_an_invalid_state(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    _fresh(path, 1)
    journal_path(path).write_bytes(b'{"op": "explode", "value": 1}\n')
    with pytest.raises(InvalidInput, match="unknown op"):
        load_state(path)
    journal_path(path).write_bytes(b"[" * 5000 + b"\n")
    with pytest.raises(InvalidInput, match="not a valid agentcg daemon state"):
        load_state(path)


def test_owner_watch_reports_exited_and_zombie_owners_once(tmp_path: Path) -> None:
    watch, seen = OwnerWatch(), []

    def collect() -> bool:
        dead = watch.dead()
        seen.extend(dead)
        return bool(dead)

    sleeper = subprocess.Popen(["sleep", "60"])
    quick = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        for i, proc in enumerate((sleeper, sleeper, quick)):
            assert watch.watch(f"c{i}", proc.pid, PROC.start_ticks(proc.pid) or 0)
        assert not watch.watch("wrong-ticks", sleeper.pid, 1)      # a recycled pid is not the owner
        # `quick` exits and stays a zombie (not waited for): dead
        assert wait_until(lambda: PROC.stat(quick.pid).state == "Z")
        assert wait_until(collect)
        assert seen == ["c2"] and watch.dead() == []
        watch.forget("c0")
        sleeper.kill()
        assert wait_until(collect)
        assert seen == ["c2", "c1"] and len(watch) == 0
    finally:
        for proc in (sleeper, quick):
            proc.kill()
            proc.wait()
        watch.close()


def test_owner_watch_opens_adopted_owners_by_pid(tmp_path: Path) -> None:
    watch = OwnerWatch()
    proc = subprocess.Popen(["sleep", "60"])
    try:
        ticks = PROC.start_ticks(proc.pid)
        assert watch.watch("c", proc.pid, ticks)             # pidfd_open, then the start time checked
        time.sleep(0.05)
        assert watch.dead() == []
        os.kill(proc.pid, 9)
        proc.wait()
        assert wait_until(lambda: watch.dead() == ["c"])
    finally:
        proc.kill()
        proc.wait()
        watch.close()
