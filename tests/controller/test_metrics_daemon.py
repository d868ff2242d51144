"""/metrics of a real daemon with eBPF loaded, fed through agentcg.client and `agentcg run`
in daemon mode; parsed with prometheus-client's own parser."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from agentcg.controller.daemon.metrics import BoundedLabels, Histogram, reason_key
from agentcg.controller.daemon.testing import daemon_process

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the daemon creates cgroups and loads BPF: run as root")
AGENTCG = Path(sys.executable).with_name("agentcg")


def _families(text: str) -> dict:
    return {family.name: family for family in text_string_to_metric_families(text)}


def _labels(family, key: str) -> set[str]:
    return {sample.labels[key] for sample in family.samples if key in sample.labels}


def test_histogram_buckets_are_cumulative_and_labels_bounded():
    h = Histogram((1.0, 2.0))
    for value in (0.5, 1.0, 1.5, 9.0):
        h.observe(value)
    assert h.buckets() == [("1.0", 2), ("2.0", 3), ("+Inf", 4)] and h.sum == 12.0
    bounded = BoundedLabels(2)
    assert [bounded(v) for v in ("a", "b", "c", "a")] == ["a", "b", "other", "a"]
    assert reason_key("budget: sandbox A at 97% of 2 GiB") == "budget"
    assert reason_key("") == "unspecified"


def test_metrics_parse_and_forget_removed_sandboxes_with_client_and_run_through_the_daemon():
    from agentcg.client import Client

    with daemon_process(ebpf={"mode": "auto"}, metrics={"max_tool_labels": 3}) as d:
        state = d.result("state")
        if not state["ebpf"]:
            pytest.skip(f"eBPF could not be loaded here (see `agentcg doctor`):\n{d.log()}")
        d.result("sandbox.create", name="A", memory_budget_bytes=512 << 20)
        d.result("sandbox.create", name="B", priority="low")
        with Client(mode="daemon", socket=d.socket_path) as client:
            touched = client.run("A", [sys.executable, "-c", "b = bytearray(64 << 20); b[::4096] = b'x' * len(b[::4096])"],
                                 tool="alloc")
            assert touched.returncode == 0
            assert touched.record.peak_memory_bytes >= 64 << 20
            assert touched.record.peak_rss_bytes is None   # RSS from page faults: the opt-in concern faults
            for i in range(4):   # 4 more tool names than max_tool_labels allows: the rest are "other"
                assert client.run("B", ["true"], tool=f"tool{i}").returncode == 0
            with client.tool_call("B", tool="ctx", command="sh -c 'exit 4'") as call:
                assert call.spawn(["sh", "-c", "exit 4"]).wait() == 4

        env = dict(os.environ, AGENTCG_SOCKET=str(d.socket_path), AGENTCG_ROOT=d.root,
                   AGENTCG_STATE_DIR=str(d.state_dir))
        run = subprocess.run([str(AGENTCG), "run", "--sandbox", "A", "--tool", "echo", "--json", "--", "echo", "hi"],
                             capture_output=True, text=True, env=env, timeout=60)
        assert run.returncode == 0 and run.stdout == "hi\n", run.stderr
        daemon_records = {r["tool"]: r for r in d.records()}
        assert daemon_records["echo"]["exit_code"] == 0            # the daemon wrote it: the run went through it
        assert daemon_records["echo"]["call_id"] in run.stderr

        families = _families(d.metrics_text())
        assert _labels(families["agentcg_sandbox_memory_bytes"], "sandbox") == {"A", "B"}
        budget = families["agentcg_sandbox_memory_budget_bytes"].samples
        assert [(s.labels["sandbox"], s.value) for s in budget] == [("A", float(512 << 20))]
        assert _labels(families["agentcg_sandbox_cpu_seconds"], "sandbox") == {"A", "B"}
        psi = families["agentcg_sandbox_pressure_stall_seconds"]
        assert {(s.labels["resource"], s.labels["kind"]) for s in psi.samples} >= {("memory", "some"), ("cpu", "some")}
        calls = {(s.labels["tool"], s.labels["outcome"]): s.value for s in families["agentcg_tool_calls"].samples}
        assert calls[("alloc", "ok")] == 1
        assert _labels(families["agentcg_tool_calls"], "tool") == {"alloc", "tool0", "tool1", "other"}
        assert calls[("other", "failed")] == 1 and calls[("other", "ok")] == 3   # tool2, tool3, echo; ctx
        assert all(s.name == "agentcg_tool_calls_total" for s in families["agentcg_tool_calls"].samples)
        duration = families["agentcg_tool_call_duration_seconds"]
        assert {s.name for s in duration.samples} == {"agentcg_tool_call_duration_seconds_bucket",
                                                      "agentcg_tool_call_duration_seconds_count",
                                                      "agentcg_tool_call_duration_seconds_sum"}
        peak = {s.labels.get("le"): s.value for s in families["agentcg_tool_call_peak_memory_bytes"].samples
                if s.labels.get("tool") == "alloc" and s.name.endswith("_bucket")}
        assert peak[str(float(16 << 20))] == 0 and peak["+Inf"] == 1
        assert "agentcg_reaction_latency_seconds" in families
        assert families["agentcg_bpf_loaded"].samples[0].value == 1
        assert families["agentcg_bpf_ringbuf_drops"].samples[0].value == 0
        runs = families["agentcg_bpf_program_runs"].samples
        if runs:   # needs BPF_ENABLE_STATS (Linux 5.8+)
            assert sum(s.value for s in runs) > 0
        assert not any("call_id" in s.labels for f in families.values() for s in f.samples)

        d.result("sandbox.remove", name="B")
        text = d.metrics_text()
        families = _families(text)
        assert 'sandbox="B"' not in text
        assert _labels(families["agentcg_sandbox_memory_bytes"], "sandbox") == {"A"}


def test_grafana_dashboard_uses_only_exported_metrics():
    import json
    import re

    from agentcg.controller.daemon.metrics import DaemonCollector, DaemonStats

    class Stub:   # a daemon with no tree and no eBPF: the collector still names every family
        stats, calls, tree, monitor = DaemonStats(), None, None, None

        class state:
            sandboxes: dict = {}

        def pending_calls(self) -> int:
            return 0

    exported = {family.name for family in DaemonCollector(Stub()).collect()}
    exported |= {"agentcg_bpf_ringbuf_drops", "agentcg_bpf_map_full", "agentcg_bpf_decode_errors",
                 "agentcg_bpf_program_runs", "agentcg_bpf_program_run_seconds"}   # only with eBPF loaded
    dashboard = json.loads((Path(__file__).parents[2] / "controller" / "data" / "grafana-dashboard.json").read_text())
    used = {re.sub(r"_(bucket|total)$", "", name)
            for panel in dashboard["panels"] for target in panel["targets"]
            for name in re.findall(r"agentcg_[a-z_]+", target["expr"])}
    assert used and used <= exported, used - exported
