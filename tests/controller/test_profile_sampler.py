"""The sandbox sampler on real cgroups (the shared `cgroup_tree` fixture), and the status line."""
from __future__ import annotations

import io
import os
import subprocess
import sys
import time
from pathlib import Path

from agentcg.controller.profile_session import ProfileSummary, StatusLine, default_sandbox_name
from agentcg.controller.sampler import SCOPE_SANDBOX, SCOPE_TOOLCALL, CallRef, SandboxSampler

MIB = 1 << 20


def test_samples_the_sandbox_and_each_call(cgroup_tree):
    tree = cgroup_tree
    tree.create("sb/agent")
    tree.create("sb/tools/c1")
    start = time.monotonic()
    # allocates 128 MiB, says so on stdout, then holds it until stdin closes
    child = tree.spawn("sb/tools/c1", [sys.executable, "-c",
                       f"import sys; x = bytearray({128 * MIB}); print('ok', flush=True); sys.stdin.read()"],
                       stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert child.stdout.readline().strip() == b"ok"
        sampler = SandboxSampler(tree, "sb")
        gone = CallRef("c-gone", "sb/tools/c-gone", start)          # ended between listing and reading
        samples = sampler.sample([CallRef("c1", "sb/tools/c1", start), gone])
    finally:
        child.stdin.close()
        child.wait()
    assert [s.scope for s in samples] == [SCOPE_SANDBOX, SCOPE_TOOLCALL]
    whole, own = samples
    assert own.call_id == "c1" and whole.call_id == "c1"          # the sandbox row names the latest call
    assert own.memory_bytes >= 128 * MIB
    assert whole.memory_bytes >= own.memory_bytes                # hierarchical: includes the call
    assert own.cpu_s > 0 and own.cpu_cores > 0
    if "psi" in tree.capabilities:
        assert own.psi_memory_some_total_s is not None and own.psi_memory_some_avg10_pct is not None
    columns = own.trace_columns()
    from agentcg.profiler.trace import SAMPLE_SCHEMA

    assert set(columns) <= set(SAMPLE_SCHEMA) and columns["scope"] == "toolcall"
    # a second sample: CPU use over the interval only; the ended call's baseline is dropped
    again = sampler.sample([])
    assert [s.scope for s in again] == [SCOPE_SANDBOX] and again[0].call_id is None
    assert set(sampler._last_cpu) == {SCOPE_SANDBOX}


def test_status_line_only_on_a_tty():
    quiet = io.StringIO()
    line = StatusLine(quiet)
    line.update("working", 10.0)
    summary = ProfileSummary(trace=Path("t"), session_id="s", sandbox="sb", returncode=0,
                             stopped_by=None, wall_s=1.0, tool_calls=3, samples=10, peak_memory_bytes=300 * MIB)
    line.finish(summary.line())
    assert quiet.getvalue() == ("agentcg profile: exit 0, 1.0 s, 3 tool call(s), 10 samples, 0 event(s), "
                                "0 LLM request(s), sandbox peak 300 MiB; wrote t\n")

    master, slave = os.openpty()
    try:
        with os.fdopen(slave, "w", closefd=True) as tty:
            live = StatusLine(tty)
            live.update("working", 10.0)
            live.update("suppressed", 10.1)            # within STATUS_EVERY_S of the last one
            live.finish("done")
        written = ""
        while not written.endswith("\n"):
            written += os.read(master, 4096).decode()
    finally:
        os.close(master)
    assert "\r\x1b[Kworking" in written and "suppressed" not in written and written.endswith("\r\x1b[Kdone\r\n")


def test_default_sandbox_name_is_a_valid_cgroup_name():
    from agentcg.controller.sandbox import validate_name

    assert default_sandbox_name(["/usr/bin/python3.11", "x"], pid=7) == "profile-python3.11-7"
    assert validate_name(default_sandbox_name(["./my agent!" + "x" * 100], pid=1))
