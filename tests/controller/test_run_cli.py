"""`agentcg run` as a subprocess on the real kernel: pass-through of stdin, stdout and the
exit code, the record on stderr, bad input (exit 2), missing programs (127), signals, and
a killed wrapper whose call is reaped by the next start."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="cgroups need root")

AGENTCG = [sys.executable, "-m", "agentcg.cli"]


@pytest.fixture
def env(cgroup_tree, tmp_path):
    return {**os.environ, "AGENTCG_ROOT": cgroup_tree.root, "AGENTCG_STATE_DIR": str(tmp_path / "state"),
            "AGENTCG_SOCKET": str(tmp_path / "no-daemon.sock"), "AGENTCG_RECORDS": str(tmp_path / "records.jsonl")}


def agentcg(env, *args, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([*AGENTCG, *args], env=env, capture_output=True, text=True, timeout=60, **kw)


def test_passes_stdin_stdout_exit_code_and_writes_the_record(env, cgroup_tree, tmp_path):
    out = agentcg(env, "run", "--sandbox", "s1", "--tool", "upper", "--mem-hint", "64M", "--priority", "high",
                  "--json", "--no-ebpf", "--", "bash", "-c", "tr a-z A-Z; exit 5", input="hello\n")
    assert out.returncode == 5 and out.stdout == "HELLO\n"
    record = json.loads(out.stderr.strip().splitlines()[-1])
    assert record["tool"] == "upper" and record["exit_code"] == 5 and record["sandbox"] == "s1"
    assert record["mem_hint_bytes"] == 64 << 20 and record["priority"] == "high" and record["cpu_s"] is not None
    assert record["peak_rss_bytes"] is None   # --no-ebpf: not measured
    assert json.loads((tmp_path / "records.jsonl").read_text())["call_id"] == record["call_id"]
    assert not cgroup_tree.exists("s1"), "the sandbox made for the call is gone after it"


def test_human_record_and_ebpf(env):
    # two short busy loops sharing one CPU: each waits on the run queue, which only eBPF
    # measures (a lone short process on an idle host may never wait, and has no wait to show)
    code = ("import os, time\nos.sched_setaffinity(0, {min(os.sched_getaffinity(0))})\n"
            "b = bytearray(32 << 20)\nchild = os.fork()\nt = time.process_time()\n"
            "while time.process_time() - t < 0.1: pass\n"
            "if child: os.waitpid(child, 0)\nelse: os._exit(0)\n")
    out = agentcg(env, "run", "--sandbox", "s1", "--", sys.executable, "-c", code)
    assert out.returncode == 0
    assert "agentcg: s1/tc-" in out.stderr and "python" in out.stderr and "ok (exit 0)" in out.stderr
    assert "runq p50/p99 -" not in out.stderr and "runq p50/p99" in out.stderr, "eBPF is loaded by default"


def test_missing_program_exits_127_with_a_record(env):
    out = agentcg(env, "run", "--sandbox", "s1", "--json", "--no-ebpf", "--", "no-such-program-xyz")
    assert out.returncode == 127 and "command not found" in out.stderr
    assert json.loads(out.stderr.strip().splitlines()[-1])["exit_code"] == 127


def test_killed_command_exits_128_plus_signal(env):
    out = agentcg(env, "run", "--sandbox", "s1", "--json", "--no-ebpf", "--", "bash", "-c", "kill -9 $$")
    assert out.returncode == 128 + signal.SIGKILL
    record = json.loads(out.stderr.strip().splitlines()[-1])
    assert record["signal"] == signal.SIGKILL and record["outcome"] == "signaled"


@pytest.mark.parametrize("args, message", [
    (["--sandbox", "a/b"], "contains '/'"),
    (["--sandbox", ".."], "bad sandbox name"),
    (["--sandbox", ""], "empty"),
    (["--sandbox", "x" * 65], "bad sandbox name"),
    (["--sandbox", "s1", "--mem-hint", "12 apples"], "--mem-hint"),
    (["--sandbox", "s1", "--priority", "urgent"], "priority"),
    (["--sandbox", "s1", "--grace", "-1s"], "--grace"),
])
def test_bad_input_exits_2(env, cgroup_tree, args, message):
    out = agentcg(env, "run", *args, "--no-ebpf", "--", "true")
    assert out.returncode == 2, out.stderr
    assert "agentcg: error:" in out.stderr and message in out.stderr
    assert not cgroup_tree.exists("") or cgroup_tree.children("") == []


def test_killed_wrapper_is_reaped_by_the_next_start(env, cgroup_tree, tmp_path):
    proc = subprocess.Popen([*AGENTCG, "run", "--sandbox", "s1", "--no-ebpf", "--", "sleep", "60"], env=env,
                            stderr=subprocess.DEVNULL)
    calls = tmp_path / "state" / "calls"
    deadline = time.monotonic() + 20
    while not (calls.is_dir() and any(calls.glob("*.json")) and _sleep_started(cgroup_tree)):
        assert time.monotonic() < deadline, "the call never started"
        time.sleep(0.02)
    proc.kill()
    proc.wait()
    assert cgroup_tree.children("s1/tools"), "the killed wrapper leaves its call behind"
    out = agentcg(env, "run", "--sandbox", "s2", "--no-ebpf", "--", "true")
    assert out.returncode == 0
    assert not cgroup_tree.exists("s1") and list(calls.glob("*.json")) == []


def _sleep_started(tree) -> bool:
    try:
        return any(tree.pids(f"s1/tools/{c}") for c in tree.children("s1/tools"))
    except Exception:
        return False


def test_reap_command(env, tmp_path):
    out = agentcg(env, "reap")
    assert out.returncode == 0 and out.stdout == ""


def test_help_mentions_the_bpf_load_cost(env):
    out = agentcg(env, "run", "--help")
    assert out.returncode == 0 and "0.3-1 s" in out.stdout and "--no-ebpf" in out.stdout
