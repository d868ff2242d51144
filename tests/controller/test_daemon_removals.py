"""Finished calls' cgroups removed off the daemon's loop (controller/daemon/removals.py),
and what a kill -9 leaves of them: real daemon, real cgroups, no mock."""
from __future__ import annotations

import os

from agentcg.controller.cgroup import open_tree
from agentcg.controller.daemon.testing import daemon_process
from testutil import wait_until


def _calls_files(d) -> list[str]:
    directory = d.state_dir / "calls"
    return sorted(os.listdir(directory)) if directory.is_dir() else []


def test_finished_calls_leave_no_cgroup_owner_file_or_mark_and_sandbox_removal_waits_for_them():
    with daemon_process() as d:
        d.result("sandbox.create", name="S")
        tree = open_tree(root=d.root)
        ids = []
        for _ in range(40):
            call_id = d.result("toolcall.begin", sandbox="S", tool="t")["call_id"]
            record = d.result("toolcall.end", call_id=call_id, exit_code=0)["record"]
            assert record["call_id"] == call_id and record["outcome"] == "ok"
            ids.append(call_id)
        assert wait_until(lambda: tree.children("S/tools") == [] and _calls_files(d) == [])
        assert {r["call_id"] for r in d.records()} == set(ids) and len(d.records()) == 40
        # sandbox.remove right after ends: the queued removals go first, the sandbox after them
        for _ in range(20):
            call_id = d.result("toolcall.begin", sandbox="S", tool="t")["call_id"]
            d.result("toolcall.end", call_id=call_id, exit_code=0)
        assert d.result("sandbox.remove", name="S") == {}
        assert not tree.exists("S")
        assert _calls_files(d) == []


def test_restart_removes_finished_calls_cgroups_instead_of_adopting_them():
    """A kill -9 between a call's record and its cgroup's removal leaves an empty cgroup and
    `<id>.done`: the next daemon removes both, adopts and records nothing for it (before,
    such a cgroup was adopted as tool "unknown" and recorded a second time). A `.done`
    whose cgroup is gone is removed; a stray cgroup without one is still adopted."""
    with daemon_process() as d:
        d.result("sandbox.create", name="S")
        running = d.result("toolcall.begin", sandbox="S", tool="held")["call_id"]
        d.kill9()
        tree = open_tree(root=d.root)
        calls = d.state_dir / "calls"
        tree.create("S/tools/tc-finished1")
        (calls / "tc-finished1.done").write_text("")
        (calls / "tc-finished1.done").chmod(0o600)
        (calls / "tc-gone0001.done").write_text("")
        tree.create("S/tools/stray-2")
        d.start()
        state = d.result("state")
        assert state["adoption"]["calls"] == 2 and state["adoption"]["unknown_calls"] == 1, state["adoption"]
        assert running in {c["call_id"] for c in state["running_calls"]}   # the empty stray may be recorded already
        assert not tree.exists("S/tools/tc-finished1")
        assert not (calls / "tc-finished1.done").exists() and not (calls / "tc-gone0001.done").exists()
        d.result("toolcall.end", call_id=running, exit_code=0)
        assert wait_until(lambda: "stray-2" in {r["call_id"] for r in d.records()})
        assert "tc-finished1" not in {r["call_id"] for r in d.records()}
        assert wait_until(lambda: tree.children("S/tools") == [])
