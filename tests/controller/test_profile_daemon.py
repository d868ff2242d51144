"""`agentcg profile` next to a real daemon (subprocess, real cgroups; controller/daemon/
testing.py): the profiled sandbox is registered with the daemon, the agent's tool call
begun through the daemon is frozen when the agent's own burst takes the sandbox past the
freeze threshold and thawed when it passes, and both actions land in the trace's events
table and in its report."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from agentcg.controller.daemon.testing import daemon_process

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the daemon creates cgroups: run the tests as root")

AGENTCG = [sys.executable, "-m", "agentcg.cli"]
MIB = 1 << 20
BUDGET = 400 * 1000**2
# the agent holds a 200 MiB burst of its own (in the agent cgroup, which no policy freezes);
# a call begun through the daemon then grows to 150 MiB, past 80% of the 400 MB budget: the
# daemon freezes the growing call; the agent drops its burst, the pressure passes, it thaws
AGENT = r'''
import os, subprocess, sys, time
from agentcg.client import Client, spawn_into

client, sandbox = Client(mode="daemon"), os.environ["AGENTCG_SANDBOX"]

def seen(kind, timeout_s=30.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if any(e["kind"] == kind for e in client.request("events.since", {"seq": 0, "sandbox": sandbox})["events"]):
            return True
        time.sleep(0.05)
    return False

burst = bytearray(200 << 20)
begun = client.request("toolcall.begin", {"sandbox": sandbox, "tool": "grow"})
grow = spawn_into(begun["cgroup_procs"], [sys.executable, "-S", "-c",
                  "import sys, time\nb = []\nfor _ in range(15):\n    b.append(bytearray(10 << 20))\n"
                  "    time.sleep(0.05)\nprint('held', flush=True)\nsys.stdin.read()"],
                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
frozen = seen("freeze")
del burst
thawed = seen("thaw")
held = grow.stdout.readline().strip() == "held"
grow.stdin.close()
grow.wait(10)
client.request("toolcall.end", {"call_id": begun["call_id"], "exit_code": 0})
print("frozen", frozen, "thawed", thawed, "held", held, flush=True)
sys.exit(0 if frozen and thawed and held else 3)
'''


def test_a_burst_frozen_by_the_daemon_is_in_the_trace(tmp_path):
    from agentcg.controller.doctor_pytest import require

    require("cgroup_layout", "cgroup_v2_freeze_kill", "bcc_load")      # profile detects calls by eBPF
    policy = {"name": "agentcg", "tick_s": 0.1, "throttle_at": 0.8, "freeze_at": 0.8, "kill_at": 0.99,
              "relax_below": 0.5, "lookahead_s": 0, "grace_s": 30.0}
    agent = tmp_path / "agent.py"
    agent.write_text(AGENT)
    trace = tmp_path / "t"
    with daemon_process(policy=policy) as d:
        env = {**os.environ, "AGENTCG_ROOT": d.root, "AGENTCG_STATE_DIR": str(tmp_path / "state"),
               "AGENTCG_SOCKET": str(d.socket_path)}
        done = subprocess.run(AGENTCG + ["profile", "--sandbox", "prof-a", "--memory-budget", str(BUDGET),
                                         "-o", str(trace), "--", sys.executable, str(agent)],
                              env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, (done.stdout, done.stderr, d.log()[-3000:])
        assert "frozen True thawed True held True" in done.stdout
        assert d.result("sandbox.list")["sandboxes"] == []          # unregistered at the end

    from agentcg.profiler.trace import read_trace

    t = read_trace(trace)
    actions = t.events[t.events.kind == "policy_action"].sort_values("time_s")
    kinds = list(actions.action)
    assert "freeze" in kinds and "thaw" in kinds and kinds.index("freeze") < kinds.index("thaw"), kinds
    freeze = actions[actions.action == "freeze"].iloc[0]
    detail = json.loads(freeze.detail)
    assert detail["source"] == "daemon" and detail["reason"] and freeze.call_id.startswith("tc-")
    start, end = t.sessions.start_s.iloc[0], t.sessions.end_s.iloc[0]
    assert start <= freeze.time_s <= end
    meta = json.loads(t.sessions.metadata.iloc[0])
    assert meta["daemon"]["registered"] == "prof-a" and meta["daemon"]["kinds"]["freeze"] >= 1

    report = subprocess.run(AGENTCG + ["report", str(trace), "--plots", str(tmp_path / "plots")],
                            capture_output=True, text=True, timeout=60)
    assert report.returncode == 0, report.stderr
    assert "policy actions: " in report.stdout and "freeze" in report.stdout and "thaw" in report.stdout
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == ["session-prof-a-" + t.sessions.session_id.iloc[0]
                                                                     .split("prof-a-")[1] + ".png",
                                                                     "tools-peak-memory.png"]
