"""The spare-cgroup pool and background removal (controller/toolcall_pool.py) and the
parked exec helper (controller/cgroup/parked.py), on the real kernel: a spare is clean
when a call takes it and never serves two calls, a dirty one is dropped, close and a
kill -9 leave nothing that the next start cannot remove, and a parked spawn behaves as
subprocess does (pipes, env, cwd, text, a missing program)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from agentcg.controller.cgroup.spawner import helper_path
from agentcg.controller.reaper import calls_dir, reap_orphans
from agentcg.controller.sandbox import tools_path
from agentcg.controller.toolcall import ToolCallManager
from testutil import wait_until

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="cgroups need root")

PY = sys.executable
needs_helper = pytest.mark.skipif(helper_path() is None, reason="the exec helper is not built (scripts/host.sh setup)")


@pytest.fixture
def pooled(cgroup_tree, tmp_path):
    m = ToolCallManager(cgroup_tree, records_path=tmp_path / "records.jsonl", grace_s=2.0, state=tmp_path / "state",
                        pool_size=2)
    m.ensure_sandbox("sb")
    try:
        yield m
    finally:
        m.close()


def _warm(mgr: ToolCallManager) -> None:
    """Two calls (the first of a sandbox asks for no spares; the second does), then the
    pool's thread idle with the sandbox's spares made."""
    for _ in range(2):
        call = mgr.begin("sb", "warm", ["true"])
        mgr.end(call, call.spawn(["true"]).wait())
    assert mgr.flush()
    assert len(mgr.pool.spares()) == 2


@needs_helper
def test_a_spare_is_clean_when_taken_and_serves_one_call(pooled, cgroup_tree):
    _warm(pooled)
    spare_ids = {s.call_id for s in pooled.pool.spares()}
    first = pooled.begin("sb", "alloc", ["python"])
    assert first.call_id in spare_ids and first.parked is not None
    # nothing in it but the helper parked there, which has not run anything yet
    assert cgroup_tree.pids(first.path) == [first.parked.proc.pid]
    proc = first.spawn([PY, "-c", "b = bytearray(48 << 20); b[::4096] = b'x' * len(b[::4096])"])
    big = pooled.end(first, proc.wait())
    second = pooled.begin("sb", "true", ["true"])
    small = pooled.end(second, second.spawn(["true"]).wait())
    assert second.call_id != first.call_id
    assert big.peak_memory_bytes >= 48 << 20
    assert small.peak_memory_bytes < 16 << 20, "the second call's cgroup carried the first one's accounting"
    assert pooled.flush()
    assert not cgroup_tree.exists(first.path) and not cgroup_tree.exists(second.path)
    # records: one per call (the warm-up's, then these two), none for a spare nobody used
    recorded = [json.loads(line)["call_id"] for line in pooled.records_path.read_text().splitlines()]
    assert recorded[2:] == [first.call_id, second.call_id]
    assert not set(recorded) & {s.call_id for s in pooled.pool.spares()}


@needs_helper
def test_a_dirty_spare_is_dropped_not_used(pooled, cgroup_tree):
    _warm(pooled)
    intruder = subprocess.Popen(["sleep", "30"])
    try:
        spares = pooled.pool.spares()
        cgroup_tree.attach(spares[0].path, intruder.pid)   # someone ran something in it
        call = pooled.begin("sb", "true", ["true"])
        assert call.call_id != spares[0].call_id
        pooled.end(call, call.spawn(["true"]).wait())
        assert pooled.flush()
        assert not cgroup_tree.exists(spares[0].path)       # removed (its intruder killed), never a call
        assert intruder.wait(10) == -signal.SIGKILL
    finally:
        intruder.kill()
        intruder.wait()


@needs_helper
def test_a_one_call_process_makes_no_spares(pooled, cgroup_tree):
    call = pooled.begin("sb", "true", ["true"])
    assert call.parked is None
    pooled.end(call, call.spawn(["true"]).wait())
    assert pooled.flush()
    assert pooled.pool.spares() == [] and cgroup_tree.children(tools_path("sb")) == []


@needs_helper
def test_close_removes_spares_owner_files_and_parked_helpers(cgroup_tree, tmp_path):
    mgr = ToolCallManager(cgroup_tree, grace_s=1.0, state=tmp_path / "state", pool_size=2)
    mgr.ensure_sandbox("sb")
    _warm(mgr)
    parked = [s.parked for s in mgr.pool.spares()]
    assert all(p is not None and p.alive() for p in parked)
    mgr.close()
    assert cgroup_tree.children(tools_path("sb")) == []
    assert list(calls_dir(tmp_path / "state").glob("*.json")) == []
    assert all(p.proc.returncode is not None for p in parked)   # reaped: no zombie left


@needs_helper
def test_parked_spawn_is_like_subprocess(pooled, tmp_path):
    _warm(pooled)
    call = pooled.begin("sb", "sh", ["sh"])
    assert call.parked is not None
    proc = call.spawn(["sh", "-c", 'echo "$FOO"; pwd; cat; echo err >&2; exit 3'], stdin=subprocess.PIPE,
                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={"FOO": "bar", "PATH": "/usr/bin:/bin"},
                      cwd=tmp_path, text=True)
    out, _ = proc.communicate("piped\n", timeout=30)
    assert proc.returncode == 3
    assert out.splitlines() == ["bar", str(tmp_path), "piped", "err"]
    record = pooled.end(call, 3)
    assert record.policy_action is None      # not a grace kill: the helper left nothing behind


@needs_helper
def test_parked_spawn_of_a_missing_program_and_an_unsupported_option(pooled, cgroup_tree):
    _warm(pooled)
    call = pooled.begin("sb", "nothing", ["no-such-program-xyz"])
    with pytest.raises(FileNotFoundError):
        call.spawn(["no-such-program-xyz"])
    assert not cgroup_tree.is_populated(call.path)    # the parked helper is gone with it
    assert pooled.end(call, 127).exit_code == 127
    # an option the helper cannot apply: the ordinary spawn, and the helper released
    call = pooled.begin("sb", "session", ["true"])
    proc = call.spawn(["sh", "-c", "exit 0"], start_new_session=True)
    assert proc.wait() == 0
    record = pooled.end(call, 0)
    assert record.policy_action is None


@needs_helper
def test_kill9_leaves_nothing_the_next_start_cannot_clean(cgroup_tree, tmp_path):
    state = tmp_path / "state"
    script = textwrap.dedent(f"""
        import os, signal, subprocess
        from agentcg.controller.cgroup import open_tree
        from agentcg.controller.toolcall import ToolCallManager
        mgr = ToolCallManager(open_tree(root={cgroup_tree.root!r}), grace_s=1.0, state={str(state)!r}, pool_size=2)
        mgr.ensure_sandbox("sb")
        for _ in range(2):
            call = mgr.begin("sb", "true", ["true"])
            mgr.end(call, call.spawn(["true"]).wait())
        assert mgr.flush()
        held = mgr.begin("sb", "sleep", ["sleep"])      # a call running when the owner dies
        held.spawn(["sleep", "60"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        print(" ".join(s.call_id for s in mgr.pool.spares()), held.call_id, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    done = subprocess.run([PY, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == -signal.SIGKILL, done.stderr
    ids = done.stdout.split()                 # the spares left, then the running call
    assert len(ids) >= 2
    assert set(cgroup_tree.children(tools_path("sb"))) >= set(ids)      # what it left behind
    # the parked helpers die with their owner (PR_SET_PDEATHSIG, end of file on their socket)
    wait_until(lambda: all(not cgroup_tree.is_populated(f"sb/tools/{i}") for i in ids[:-1]
                           if cgroup_tree.exists(f"sb/tools/{i}")), timeout_s=10)
    reaped = reap_orphans(cgroup_tree, state)
    assert {r.call_id for r in reaped} >= set(ids)
    assert cgroup_tree.children(tools_path("sb")) == []
    assert list(calls_dir(state).glob("*.json")) == []
