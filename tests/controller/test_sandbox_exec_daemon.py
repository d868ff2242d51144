"""`agentcg sandbox exec` through a running daemon: the daemon detects the agent's
commands, so they are the daemon's tool calls (state, /metrics, records). Real daemon,
real eBPF (the exec detector's programs load in the daemon), real processes."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
from testutil import wait_until

PY = sys.executable


@pytest.fixture
def daemon():
    if os.geteuid() != 0:
        pytest.skip("the daemon and its eBPF programs need root")
    try:
        import bcc  # noqa: F401
    except ImportError:
        pytest.skip("bcc is not installed (Debian package python3-bpfcc)")
    from agentcg.controller.daemon.testing import daemon_process
    with daemon_process() as d:
        yield d


def _exec(d, tmp_path, script: str, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "AGENTCG_SOCKET": str(d.socket_path), "AGENTCG_STATE_DIR": str(tmp_path / "client-state")}
    return subprocess.Popen([PY, "-m", "agentcg.cli", "sandbox", "exec", *extra, "ag1", "--", "bash", "-c", script],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _calls(d, tool: str) -> list[dict]:
    return [c for c in d.result("state")["running_calls"] if c["sandbox"] == "ag1" and c["tool"] == tool]


def test_agent_commands_are_the_daemons_calls(daemon, tmp_path):
    d = daemon
    gate = tmp_path / "gate"
    # the agent: a command it waits on (visible in the daemon's state while it runs), one
    # that fails, then bash exec's its last command itself
    script = (f"{PY} -c 'import os, time\nwhile not os.path.exists(\"{gate}\"): time.sleep(0.02)'; "
              "ls /nonexistent-agentcg; sleep 0.1")
    agent = _exec(d, tmp_path, script)
    try:
        assert wait_until(lambda: _calls(d, os.path.basename(PY)), timeout_s=60), (d.result("state"), d.log())
        running = _calls(d, os.path.basename(PY))[0]
        assert running["command"].startswith(PY)
    finally:
        gate.touch()
    _, err = agent.communicate(timeout=60)
    assert agent.returncode == 0, err
    assert "through the daemon" in err
    assert wait_until(lambda: len([r for r in d.records() if r["sandbox"] == "ag1"]) >= 3, timeout_s=30), d.records()
    records = {r["tool"]: r for r in d.records() if r["sandbox"] == "ag1"}
    assert records[os.path.basename(PY)]["exit_code"] == 0
    assert records["ls"]["exit_code"] == 2 and records["ls"]["outcome"] == "failed"
    assert records["sleep"]["exit_code"] == 0
    metrics = d.metrics_text()
    assert 'agentcg_tool_calls_total{outcome="failed",tool="ls"} 1.0' in metrics, metrics
    assert 'agentcg_tool_calls_total{outcome="ok",tool="sleep"} 1.0' in metrics
    # the sandbox was made for this agent: gone with it, and no call is left behind
    assert wait_until(lambda: not [s for s in d.result("state")["sandboxes"] if s["name"] == "ag1"], timeout_s=30)
    assert not [c for c in d.result("state")["running_calls"] if c["sandbox"] == "ag1"]


def test_no_detect_and_status_through_the_daemon(daemon, tmp_path):
    agent = _exec(daemon, tmp_path, "cat /proc/self/cgroup; exit 5", "--no-detect")
    out, err = agent.communicate(timeout=60)
    assert agent.returncode == 5, err
    assert "/ag1/agent" in out                      # the daemon's agent cgroup, joined before exec
    assert not [r for r in daemon.records() if r["sandbox"] == "ag1"]


def test_bad_arguments_are_refused(daemon):
    refused = daemon.request("sandbox.exec_begin", sandbox="ag1", tools=["a/b"])
    assert refused["error"]["code"] == "invalid_input" and "glob" in refused["error"]["message"]
    assert daemon.request("sandbox.exec_end", watch_id=99)["error"]["code"] == "not_found"


def test_a_watch_outlives_a_daemon_kill9(daemon, tmp_path):
    """`sandbox exec` through the daemon, the daemon killed with SIGKILL and started again:
    the new daemon re-establishes the watch, so the agent's next command is a tool call in
    its state and records, and the client's exec_end reaches it."""
    d = daemon
    first, second, done = tmp_path / "first", tmp_path / "second", tmp_path / "done"
    wait_for = "import os, sys, time\nwhile not os.path.exists(sys.argv[1]): time.sleep(0.02)"
    script = (f"{PY} -c '{wait_for}' {first}; "
              f"while [ ! -e {second} ]; do sleep 0.05; done; "
              f"{PY} -c '{wait_for}' {done}; exit 4")
    agent = _exec(d, tmp_path, script, "--tools", os.path.basename(PY))
    try:
        assert wait_until(lambda: _calls(d, os.path.basename(PY)), timeout_s=60), (d.result("state"), d.log())
        [moved] = _calls(d, os.path.basename(PY))
        d.kill9()           # while the first command runs
        d.start()
        assert "re-established 1 exec watch" in d.log(), d.log()
        # the moved command is adopted under its own name; the dead daemon's spares are gone
        assert [c["call_id"] for c in _calls(d, os.path.basename(PY))] == [moved["call_id"]], d.log()
        assert not _calls(d, "unknown"), d.result("state")
        first.touch()
        assert wait_until(lambda: not _calls(d, os.path.basename(PY)), timeout_s=60), d.result("state")
        second.touch()      # the agent's next command runs under the new daemon
        assert wait_until(lambda: _calls(d, os.path.basename(PY)), timeout_s=60), (d.result("state"), d.log())
        [call] = _calls(d, os.path.basename(PY))
        assert str(done) in call["command"]
    finally:
        for gate in (first, second, done):
            gate.touch()
    _, err = agent.communicate(timeout=60)
    assert agent.returncode == 4, err
    assert "through the daemon" in err and "no longer watches" not in err, err
    assert wait_until(lambda: any(r["call_id"] == call["call_id"] for r in d.records()), timeout_s=30), d.records()
    record = next(r for r in d.records() if r["call_id"] == call["call_id"])
    assert record["exit_code"] == 0 and record["tool"] == os.path.basename(PY)
    assert wait_until(lambda: not [s for s in d.result("state")["sandboxes"] if s["name"] == "ag1"], timeout_s=30)
    # the first command, moved by the killed daemon, is recorded once under its own name
    mine = [r for r in d.records() if r["sandbox"] == "ag1"]
    assert sorted(r["call_id"] for r in mine) == sorted([moved["call_id"], call["call_id"]]), mine
    assert [r["tool"] for r in mine] == [os.path.basename(PY)] * 2, mine
    assert str(first) in next(r for r in mine if r["call_id"] == moved["call_id"])["command"]
    assert next(r for r in mine if r["call_id"] == moved["call_id"])["exit_code"] == 0   # its exit seen by the new daemon
