"""`agentcg sandbox create|list|rm|exec` as subprocesses on the real kernel, and the
issue's example: `sandbox exec S -- bash -c 'ls; python3 -c ...; sleep 0.2'` gives one
record per command and leaves no cgroup behind."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="cgroups need root")

AGENTCG = [sys.executable, "-m", "agentcg.cli"]


@pytest.fixture
def env(cgroup_tree, tmp_path):
    return {**os.environ, "AGENTCG_ROOT": cgroup_tree.root, "AGENTCG_STATE_DIR": str(tmp_path / "state"),
            "AGENTCG_RECORDS": str(tmp_path / "records.jsonl")}


def agentcg(env, *args, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([*AGENTCG, *args], env=env, capture_output=True, text=True, timeout=90, **kw)


def records(stderr: str) -> list[dict]:
    return [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]


def test_create_list_rm(env, cgroup_tree):
    assert agentcg(env, "sandbox", "create", "box", "--priority", "low").returncode == 0
    assert cgroup_tree.exists("box/agent") and cgroup_tree.exists("box/tools")
    listed = json.loads(agentcg(env, "sandbox", "list", "--json").stdout)
    assert [s["name"] for s in listed] == ["box"] and listed[0]["calls"] == []
    out = agentcg(env, "run", "--sandbox", "box", "--no-ebpf", "--", "true")
    assert out.returncode == 0 and cgroup_tree.exists("box"), "a sandbox made on purpose outlives its calls"
    assert agentcg(env, "sandbox", "rm", "box").returncode == 0
    assert not cgroup_tree.exists("box")
    missing = agentcg(env, "sandbox", "rm", "box")
    assert missing.returncode == 1 and "no sandbox 'box'" in missing.stderr


@pytest.mark.parametrize("name", ["a/b", "..", "", "y" * 70])
def test_bad_names_exit_2(env, name):
    for args in (["sandbox", "create", name], ["sandbox", "exec", name, "--", "true"], ["sandbox", "rm", name]):
        out = agentcg(env, *args)
        assert out.returncode == 2 and "agentcg: error:" in out.stderr, (args, out.stderr)


def test_issue_example_one_record_per_command(env, cgroup_tree, tmp_path):
    script = "ls >/dev/null; python3 -c 'b = bytearray(40 << 20)'; sleep 0.2"
    out = agentcg(env, "sandbox", "exec", "--json", "s1", "--", "bash", "-c", script)
    assert out.returncode == 0, out.stderr
    got = records(out.stderr)
    assert [r["tool"] for r in got] == ["ls", "python3", "sleep"], got
    assert all(r["exit_code"] == 0 and r["sandbox"] == "s1" for r in got)
    python, sleep = got[1], got[2]
    assert python["peak_rss_bytes"] is None and python["peak_memory_bytes"] >= 40 << 20   # faults is opt-in
    assert sleep["duration_s"] >= 0.15, "bash exec'd sleep in its own process: still a call of its own"
    assert len({r["call_id"] for r in got}) == 3
    assert len((tmp_path / "records.jsonl").read_text().splitlines()) == 3
    assert not cgroup_tree.exists("") or cgroup_tree.children("") == []
    assert list((tmp_path / "state" / "calls").glob("*.json")) == []


def test_exec_passes_the_exit_code_and_honours_the_globs(env):
    out = agentcg(env, "sandbox", "exec", "--json", "--tools", "cat", "s1", "--", "bash", "-c",
                  "echo hi | cat; ls >/dev/null; exit 4")
    assert out.returncode == 4 and out.stdout == "hi\n"
    assert [r["tool"] for r in records(out.stderr)] == ["cat"]


def test_exec_no_detect_runs_in_the_agent_cgroup(env):
    out = agentcg(env, "sandbox", "exec", "--json", "--no-detect", "s1", "--", "bash", "-c",
                  "cat /proc/self/cgroup; ls >/dev/null")
    assert out.returncode == 0 and records(out.stderr) == []
    assert "/s1/agent" in out.stdout
