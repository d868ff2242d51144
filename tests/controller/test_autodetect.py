"""Exec-driven tool-call detection: the glob matcher (table), and ExecDetector in-process
with a real BpfMonitor: records per command, descendants follow the command, and after
close no cgroup and no BPF map entry is left."""
from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from agentcg.controller.autodetect import DEFAULT_TOOL_GLOBS, ExecDetector, ToolMatcher, parse_globs
from agentcg.controller.sandbox import agent_path
from agentcg.controller.toolcall import ToolCallManager
from agentcg.errors import InvalidInput


@pytest.mark.parametrize("filename, expected", [
    ("/usr/bin/bash", True), ("/bin/sh", True), ("/usr/bin/ls", True), ("/usr/bin/cat", True),
    ("/usr/bin/sleep", True), ("/usr/bin/python3.11", True), ("/usr/local/bin/pytest", True),
    ("/usr/bin/git", True), ("/opt/agent/bin/my-agent", False), ("/usr/lib/systemd/systemd", False),
])
def test_default_globs(filename, expected):
    assert ToolMatcher().matches(filename) is expected


def test_custom_globs_and_exclude():
    m = ToolMatcher(parse_globs("py*, make"), parse_globs(["pyenv*"]))
    assert m.matches("/usr/bin/python3") and m.matches("make") and not m.matches("/x/pyenv-exec")
    assert not m.matches("ls")
    assert "ls" in DEFAULT_TOOL_GLOBS and "bash" in DEFAULT_TOOL_GLOBS


@pytest.mark.parametrize("bad", ["a/b", "x" * 200, ["ok", "tab\there"]])
def test_bad_globs(bad):
    with pytest.raises(InvalidInput):
        parse_globs(bad)


@pytest.fixture(scope="module")
def monitor(monitor_with_exit_codes):
    """Detected commands get their exit status from the exit_codes concern."""
    return monitor_with_exit_codes


def test_detector_records_each_command_and_leaves_nothing(cgroup_tree, tmp_path, monitor):
    mgr = ToolCallManager(cgroup_tree, monitor=monitor, grace_s=1.0, state=tmp_path)
    created = mgr.ensure_sandbox("s1")
    detector = ExecDetector(mgr, monitor, "s1", agent_pid=0)
    detector.prepare()
    # the agent sleeps first so the detector is polling before its commands start; the
    # python command forks a child that must end up in the python call's cgroup
    script = ("sleep 0.2; "
              f"{sys.executable} -c 'import subprocess, time; p = subprocess.Popen([\"sleep\", \"0.3\"]); "
              "time.sleep(0.1); print(open(\"/proc/%d/cgroup\" % p.pid).read().splitlines()[-1]); p.wait()'; "
              "exit 3")
    agent = cgroup_tree.spawn(agent_path("s1"), ["bash", "-c", script], stdout=subprocess.PIPE, text=True)
    detector.agent_pid = agent.pid
    deadline = time.monotonic() + 30
    while agent.poll() is None and time.monotonic() < deadline:
        detector.step(0.02)
    assert agent.returncode == 3
    detector.agent_exited(agent.returncode)
    detector.close()
    got = detector.records
    assert [r.tool for r in got] == ["sleep", os.path.basename(sys.executable)], got
    assert got[0].exit_code == 0 and got[1].exit_code == 0
    python_call = got[1]
    assert f"/s1/tools/{python_call.call_id}" in agent.stdout.read(), "the command's child runs in its call"
    assert python_call.processes >= 2 and python_call.cpu_s > 0
    mgr.close()
    if created:
        mgr.remove_sandbox_if_unused("s1")
    monitor.poll(0)
    assert cgroup_tree.children("") == []
    assert set(monitor.live_entries().values()) <= {0}, monitor.live_entries()
    assert monitor.watched() == frozenset()
