"""`agentcg profile` on the real kernel: cgroups below an `agentcg-test-` root, the eBPF
exec detector, real commands. Each test checks afterwards that no cgroup of its root is left."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from testutil import profile_env

AGENTCG = [sys.executable, "-m", "agentcg.cli"]
ALLOC_MIB = 300
MIB = 1 << 20
# three commands; the second touches every page of 300 MiB (the cgroup is charged all of it)
ALLOC = f"{sys.executable} -c 'import time; x = bytearray({ALLOC_MIB} * {MIB}); time.sleep(0.3)'"
THREE_COMMANDS = f"ls / >/dev/null; {ALLOC}; sleep 0.2"


@pytest.fixture
def env(tmp_path: Path):
    yield from profile_env(tmp_path, "profile")


def _agentcg(args: list[str], env: dict, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(AGENTCG + args, env=env, capture_output=True, text=True, timeout=60, **kwargs)


def test_three_commands_give_three_tool_calls_and_the_allocation_peak(env, tmp_path):
    trace = tmp_path / "t"
    done = _agentcg(["profile", "-o", str(trace), "--", "bash", "-c", THREE_COMMANDS], env)
    assert done.returncode == 0, done.stderr
    assert "3 tool call(s)" in done.stderr            # stderr is not a TTY: one summary line
    assert "\x1b[K" not in done.stderr

    text = _agentcg(["report", str(trace)], env)
    assert text.returncode == 0, text.stderr
    assert "tool calls: 3" in text.stdout
    report = json.loads(_agentcg(["report", "--json", str(trace)], env).stdout)
    tools = {t["tool"]: t for t in report["aggregate"]["tools"]}
    assert sorted(tools) == sorted(["ls", os.path.basename(sys.executable), "sleep"])
    assert tools[os.path.basename(sys.executable)]["peak_memory_p50_bytes"] >= ALLOC_MIB * MIB
    # a short `ls` may exit before the detector moves it: then its peak is not measured (None)
    assert (tools["ls"]["peak_memory_p50_bytes"] or 0) < 64 * MIB

    from agentcg.profiler.trace import read_trace

    t = read_trace(trace)
    assert t.complete
    python = t.toolcalls[t.toolcalls["tool"] == os.path.basename(sys.executable)].iloc[0]
    assert python["exit_code"] == 0 and python["cpu_s"] > 0
    # the sampler saw the allocation both in the call's own cgroup and in the whole sandbox
    own = t.samples[(t.samples["scope"] == "toolcall") & (t.samples["call_id"] == python["call_id"])]
    whole = t.samples[t.samples["scope"] == "sandbox"]
    assert own["memory_bytes"].max() >= 200 * MIB        # sampled every 100 ms: near the peak, not at it
    assert whole["memory_bytes"].max() >= own["memory_bytes"].max()
    assert whole["psi_memory_some_total_s"].notna().all() and whole["cpu_cores"].notna().all()
    session = t.sessions.iloc[0]
    assert session["source"] == "agentcg" and session["end_s"] > session["start_s"]


def test_sigterm_stops_the_agent_and_keeps_what_was_recorded(env, tmp_path):
    trace = tmp_path / "t"
    proc = subprocess.Popen(AGENTCG + ["profile", "-o", str(trace), "--interval", "50ms", "--",
                                       "bash", "-c", "ls / >/dev/null; sleep 60; echo never"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not _running_sleep(env["AGENTCG_ROOT"]):
            time.sleep(0.1)
        assert _running_sleep(env["AGENTCG_ROOT"]), "the sleep never ran as a tool call"
        proc.send_signal(signal.SIGTERM)
        _out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "stopped by signal 15" in err

    from agentcg.profiler.trace import read_trace

    t = read_trace(trace)
    assert t.complete
    calls = t.toolcalls.set_index("tool")
    assert set(calls.index) == {"ls", "sleep"}
    assert calls.loc["sleep", "end_wall_s"] > calls.loc["sleep", "start_wall_s"]   # ended, not left open
    assert (t.samples["call_id"] == calls.loc["sleep", "call_id"]).sum() >= 2


def _running_sleep(root: str) -> bool:
    """A `sleep` process sits in a tool-call cgroup below `root`."""
    for procs in Path("/sys/fs/cgroup/unified", root).glob("*/tools/*/cgroup.procs"):
        for pid in procs.read_text().split():
            try:
                if Path(f"/proc/{pid}/comm").read_text().strip() == "sleep":
                    return True
            except FileNotFoundError:
                continue
    for procs in Path("/sys/fs/cgroup", root).glob("*/tools/*/cgroup.procs"):   # pure v2 host
        for pid in procs.read_text().split():
            try:
                if Path(f"/proc/{pid}/comm").read_text().strip() == "sleep":
                    return True
            except FileNotFoundError:
                continue
    return False


def test_refusals_happen_before_anything_is_created(env, tmp_path):
    existing = tmp_path / "taken"
    existing.mkdir()
    (existing / "x").write_text("x")
    done = _agentcg(["profile", "-o", str(existing), "--", "true"], env)
    assert done.returncode == 1 and "already exists" in done.stderr
    done = _agentcg(["profile", "-o", str(tmp_path / "t"), "--interval", "1ms", "--", "true"], env)
    assert done.returncode == 2 and "--interval" in done.stderr
    done = _agentcg(["profile", "-o", str(tmp_path / "t"), "--sandbox", "../x", "--", "true"], env)
    assert done.returncode == 2 and "sandbox name" in done.stderr
    assert not (tmp_path / "t").exists()


def test_a_missing_command_exits_127_with_a_trace(env, tmp_path):
    done = _agentcg(["profile", "-o", str(tmp_path / "t"), "--", "no-such-command-agentcg"], env)
    assert done.returncode == 127
    assert "command not found" in done.stderr

    from agentcg.profiler.trace import read_trace

    t = read_trace(tmp_path / "t")
    assert t.complete and len(t.sessions) == 1 and t.toolcalls.empty
