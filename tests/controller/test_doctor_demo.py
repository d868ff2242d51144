"""`agentcg demo` end to end on the real kernel: doctor, the shipped traces' report, a live
profile below an `agentcg-test-` cgroup root; afterwards no cgroup and no temporary file is left."""
from __future__ import annotations

import os
import re
import secrets
import subprocess
import sys
from pathlib import Path

from agentcg.demo import TRACES_DIR, format_doctor_short, shipped_traces


def test_demo_reports_the_traces_and_profiles_a_session_then_cleans_up(tmp_path):
    from agentcg.controller.doctor_pytest import require

    require("cgroup_layout", "cgroup_v2_freeze_kill", "bcc_load")
    root = f"agentcg-test-demo-{secrets.token_hex(4)}"
    temp = tmp_path / "tmp"
    temp.mkdir()
    env = {**os.environ, "AGENTCG_ROOT": root, "TMPDIR": str(temp)}
    try:
        done = subprocess.run([sys.executable, "-m", "agentcg.cli", "demo", "--alloc", "96M"], env=env,
                              capture_output=True, text=True, timeout=90)
    finally:
        left = list(Path("/sys/fs/cgroup").glob(f"*/{root}")) + list(Path("/sys/fs/cgroup").glob(root))
    assert done.returncode == 0, done.stderr
    assert not left, f"the demo left cgroups: {left}"
    assert not list(temp.iterdir()), "the demo left temporary files"
    out = done.stdout
    assert "core (BPF and cgroups): ok" in out
    assert f"sessions: {len(shipped_traces())}" in out            # the report of traces/
    assert "3 tool call(s)" in done.stderr                        # the live profile's summary line
    live = out.split("== agentcg report demo-trace ==")[1]
    assert "tool calls: 3" in live
    python = re.search(r"^python\S*\s+1\s+\S+\s+\S+\s+1\s+(\d+)", live, re.M)
    assert python, live
    assert int(python.group(1)) >= 96 * 2**20 / 1e6               # peak p50 in MB >= the 96 MiB touched


def test_the_repository_ships_small_traces_that_read_back():
    from agentcg.profiler.trace import read_trace

    traces = shipped_traces()
    assert len(traces) >= 3, f"expected the recorded traces in {TRACES_DIR}"
    for path in traces:
        assert path.stat().st_size < 1_000_000
        trace = read_trace(path)
        assert trace.complete and trace.source == "agentcg"
        assert len(trace.toolcalls) >= 3 and trace.toolcalls["end_wall_s"].notna().all()
        assert (trace.samples["scope"] == "sandbox").sum() >= 5


def test_doctor_short_form_groups_checks_by_status():
    from agentcg.controller.doctor import HostReport, Check

    report = HostReport((Check("btf", "ok", "x"), Check("swap", "missing", "y", "fix it"),
                         Check("bcc_load", "ok", "z")), 0.1)
    text = format_doctor_short(report)
    assert "  ok:          btf, bcc_load" in text and "  missing:     swap" in text
    assert "NOT ok:" in text and "warning" not in text
