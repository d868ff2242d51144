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
