"""What `agentcg profile` records besides calls and cgroup samples: OOM kills and reclaim
stalls from eBPF (real kernel, a real memory limit), the LLM record file the agent writes
(real files), and GPU samples per process (real processes and /proc; NVML is a mock, as in
tests/gpu/test_nvml.py, because this host has no NVIDIA driver)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from testutil import profile_env

from agentcg.profiler.llm_records import BadRecord, parse_record

AGENTCG = [sys.executable, "-m", "agentcg.cli"]
MIB = 1 << 20
GPU_MARKER = "agentcg-gpu-marker"
GPU_BYTES = 3 * 2**30


@pytest.fixture
def env(tmp_path: Path):
    yield from profile_env(tmp_path, "profsrc")


AGENT = f"""
echo '{{"request_id": "r1", "model": "m", "input_tokens": 1200, "output_tokens": 30}}' >> "$AGENTCG_LLM_RECORD"
{sys.executable} -c 'import time; x = bytearray(200 * {MIB}); time.sleep(0.2)'
echo '{{"usage": {{"input_tokens": 8, "cache_creation_input_tokens": 252, "cache_read_input_tokens": 20773, "output_tokens": 85}}}}' >> "$AGENTCG_LLM_RECORD"
echo 'not json' >> "$AGENTCG_LLM_RECORD"
printf '{{"usage": {{"prompt_tokens": 9000, "completion_tokens": 4, "prompt_tokens_details": {{"cached_tokens": 8192}}}}}}' >> "$AGENTCG_LLM_RECORD"
"""


def test_oom_kill_reclaim_stalls_and_llm_record(env, tmp_path):
    trace, record = tmp_path / "t", tmp_path / "llm.jsonl"
    record.write_text('{"request_id": "before", "input_tokens": 5}\n')   # written before the session: not read
    done = subprocess.run(AGENTCG + ["profile", "--no-daemon", "--memory-max", "64MB", "--llm-record", str(record),
                                     "-o", str(trace), "--", "bash", "-c", AGENT],
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "3 LLM request(s)" in done.stderr and "left out 1 line(s): line 4: not JSON" in done.stderr

    from agentcg.profiler.trace import read_trace

    t = read_trace(trace)
    python = t.toolcalls[t.toolcalls.tool == os.path.basename(sys.executable)].iloc[0]
    assert python.oom_killed and python.signal == 9
    ooms = t.events[t.events.kind == "oom_kill"]
    assert len(ooms) == 1 and ooms.call_id.iloc[0] == python.call_id and ooms.amount_bytes.iloc[0] > 16 * MIB
    assert json.loads(ooms.detail.iloc[0])["comm"] == os.path.basename(sys.executable)[:15]
    # the 64 MB limit made the allocation reclaim; stalls of >= 10 ms are events of that call
    stalls = t.events[t.events.kind == "reclaim_stall"]
    assert set(stalls.call_id) <= {python.call_id}
    llm = t.llm_requests.set_index("request_id")
    assert list(llm.index) == ["r1", "llm-3", "llm-5"]
    assert llm.loc["r1", ["input_tokens", "output_tokens", "usage_format"]].tolist() == [1200, 30, "plain"]
    assert llm.loc["llm-3", ["input_tokens", "cache_read_tokens", "cache_creation_tokens"]].tolist() == \
        [21033, 20773, 252]
    assert llm.loc["llm-5", ["input_tokens", "cache_read_tokens", "usage_format"]].tolist() == [9000, 8192, "openai"]
    meta = json.loads(t.sessions.metadata.iloc[0])
    assert meta["llm_record"] == str(record) and meta["bpf_events"]["oom_kill"] == 1 and meta["daemon"] is None
    assert t.sessions.memory_limit_bytes.iloc[0] == 64 * 1000**2

    text = subprocess.run(AGENTCG + ["report", str(trace)], env=env, capture_output=True, text=True, timeout=60)
    assert text.returncode == 0, text.stderr
    assert "OOM kills: 1" in text.stdout


class FakeNvml:
    """Mock of pynvml (this host has no NVIDIA driver): one GPU whose compute processes are
    the live processes with GPU_MARKER in their command line, each using GPU_BYTES."""

    NVML_SUCCESS, NVML_ERROR_NOT_SUPPORTED = 0, 3
    NVML_FI_DEV_PCIE_COUNT_TX_BYTES, NVML_FI_DEV_PCIE_COUNT_RX_BYTES = 197, 198
    NVML_PCIE_UTIL_TX_BYTES, NVML_PCIE_UTIL_RX_BYTES = 0, 1

    class NVMLError(Exception):
        pass

    def __init__(self) -> None:
        self.shutdowns = 0

    def nvmlInit(self): pass
    def nvmlShutdown(self): self.shutdowns += 1
    def nvmlDeviceGetCount(self): return 1
    def nvmlDeviceGetHandleByIndex(self, i): return i
    def nvmlDeviceGetName(self, h): return "Fake H100"
    def nvmlDeviceGetUUID(self, h): return "GPU-0"
    def nvmlDeviceGetMemoryInfo(self, h): return SimpleNamespace(used=40 * 2**30, total=80 * 2**30)
    def nvmlDeviceGetUtilizationRates(self, h): return SimpleNamespace(gpu=70, memory=20)

    def nvmlDeviceGetFieldValues(self, h, ids):
        return [SimpleNamespace(nvmlReturn=self.NVML_ERROR_NOT_SUPPORTED, value=None) for _ in ids]

    def nvmlDeviceGetPcieThroughput(self, h, counter):
        raise self.NVMLError("not supported")

    def nvmlDeviceGetComputeRunningProcesses(self, h):
        procs = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    if GPU_MARKER.encode() in (entry / "cmdline").read_bytes():
                        procs.append(SimpleNamespace(pid=int(entry.name), usedGpuMemory=GPU_BYTES))
                except OSError:
                    continue
        return procs

    def nvmlDeviceGetGraphicsRunningProcesses(self, h):
        raise self.NVMLError("not supported")


def test_gpu_samples_per_process_mapped_to_the_sandbox_and_call(env, tmp_path, monkeypatch):
    from agentcg.controller.profile_session import SourceOptions, profile_command
    from agentcg.profiler.trace import read_trace

    monkeypatch.setenv("AGENTCG_STATE_DIR", env["AGENTCG_STATE_DIR"])
    fake = FakeNvml()
    # the marker quoted in two halves: only the python process's argv holds it whole, not bash's
    command = f"sleep 0.3; {sys.executable} -c 'import time; time.sleep(1.0)' {GPU_MARKER[:8]}'{GPU_MARKER[8:]}'"
    summary = profile_command(["bash", "-c", command], tmp_path / "t", interval_s=0.1, root=env["AGENTCG_ROOT"],
                              state=Path(env["AGENTCG_STATE_DIR"]), status=open(os.devnull, "w"),
                              sources=SourceOptions(daemon_socket=False, nvml=fake))
    assert summary.returncode == 0 and fake.shutdowns == 1
    t = read_trace(tmp_path / "t")
    python = t.toolcalls[t.toolcalls.tool == os.path.basename(sys.executable)].call_id.iloc[0]
    sleep = t.toolcalls[t.toolcalls.tool == "sleep"].call_id.iloc[0]
    whole = t.samples[t.samples.scope == "sandbox"]
    own = t.samples[(t.samples.scope == "toolcall") & (t.samples.call_id == python)]
    assert (whole.gpu_memory_bytes == GPU_BYTES).sum() >= 5 and (own.gpu_memory_bytes == GPU_BYTES).sum() >= 5
    assert set(whole.gpu_util_pct.dropna()) == {70.0}
    # not on the GPU: the sleep call, and the sandbox before the python call began
    assert t.samples[(t.samples.scope == "toolcall") & (t.samples.call_id == sleep)].gpu_memory_bytes.isna().all()
    assert whole.sort_values("time_s").gpu_memory_bytes.iloc[0] is pd_na()
    assert json.loads(t.sessions.metadata.iloc[0])["gpu"]["samples"] >= 5


def pd_na():
    import pandas as pd

    return pd.NA


def test_bad_source_options_exit_2_before_anything_runs(env, tmp_path):
    for args, why in [(["--memory-budget", "1GB", "--no-daemon"], "needs the daemon"),
                      (["--memory-budget", "1GB", "--daemon-socket", str(tmp_path / "none.sock"), "--no-daemon"],
                       "contradict"),
                      (["--memory-max", "1kB", "--no-daemon"], "below 1 MiB"),
                      (["--memory-max", "lots", "--no-daemon"], "--memory-max")]:
        done = subprocess.run(AGENTCG + ["profile", "-o", str(tmp_path / "t"), *args, "--", "true"], env=env,
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 2 and why in done.stderr and "Traceback" not in done.stderr, (args, done.stderr)
    env = {**env, "AGENTCG_SOCKET": str(tmp_path / "no-daemon.sock")}
    done = subprocess.run(AGENTCG + ["profile", "-o", str(tmp_path / "t"), "--memory-budget", "1GB", "--", "true"],
                          env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "no agentcg daemon socket" in done.stderr, done.stderr
    assert not (tmp_path / "t").exists()


def test_llm_record_lines(tmp_path):
    row = parse_record(b'{"time_s": 5.5, "input_tokens": 10, "is_sidechain": true, "duration_s": 2}', 1, 9.0)
    assert row == {"time_s": 5.5, "input_tokens": 10, "is_sidechain": True, "duration_s": 2,
                   "usage_format": "plain", "request_id": "llm-1"}
    for line, why in [(b"[1]", "not a JSON object"), (b'{"output_tokens": 3}', "needs input_tokens"),
                      (b'{"input_tokens": -1}', "non-negative int"), (b'{"input_tokens": true}', "non-negative int"),
                      (b'{"usage": 7}', "'usage' must be an object"), (b"x" * 70_000, "longer than"),
                      (b'{"usage": {"input_tokens": 1.5}}', "input_tokens must be a non-negative integer")]:
        with pytest.raises(BadRecord, match=why):
            parse_record(line, 3, 0.0)


def test_llm_record_tail_waits_for_whole_lines(tmp_path):
    from agentcg.controller.profile_sources import LlmRecordTail

    rows: list[dict] = []
    path = tmp_path / "r.jsonl"
    tail = LlmRecordTail(path, rows.append)
    tail.step()                                   # no file yet: nothing, no error
    with open(path, "w") as fh:
        fh.write('{"input_tokens": 1}\n{"input_tok')
    tail.step()
    assert [r["input_tokens"] for r in rows] == [1]
    with open(path, "a") as fh:
        fh.write('ens": 2}\n\n{"input_tokens": 3}')
    tail.step()
    assert [r["input_tokens"] for r in rows] == [1, 2]
    tail.close()                                  # the last line, without its newline
    assert [r["request_id"] for r in rows] == ["llm-1", "llm-2", "llm-4"] and tail.errors.count == 0


class LogClient:
    """Stands in for the daemon's socket in front of DaemonEvents only: it answers
    events.since from a list the way controller/core/events.py does (monotonic times,
    pages of `page` events). The real daemon path is tests/controller/test_profile_daemon.py;
    this covers the engine-link kinds (kv_directive, llm_request) no engine here produces."""

    def __init__(self, events, page=2):
        self.events, self.page, self.asked = events, page, []

    def request(self, op, args):
        assert op == "events.since"
        self.asked.append(dict(args))
        out = [e for e in self.events if e["seq"] >= args["seq"] and e["sandbox"] in (None, args["sandbox"])]
        out = out[: self.page]
        return {"events": out, "next_seq": out[-1]["seq"] + 1 if out else args["seq"], "dropped": 0}


def test_daemon_event_kinds_become_rows():
    import time

    from agentcg.controller.profile_daemon import DaemonEvents

    now = time.monotonic()
    log = [
        {"seq": 1, "time_s": now - 2, "kind": "freeze", "sandbox": "sb", "call_id": "tc-1", "detail": {"reason": "r"}},
        {"seq": 2, "time_s": now - 1, "kind": "thaw", "sandbox": "sb", "call_id": "tc-1", "detail": {}},
        {"seq": 3, "time_s": now, "kind": "kill", "sandbox": "other", "call_id": "tc-9", "detail": {}},
        {"seq": 4, "time_s": now, "kind": "oom_kill", "sandbox": "sb", "call_id": "tc-1", "detail": {}},
        {"seq": 5, "time_s": now, "kind": "kv_directive", "sandbox": "sb", "call_id": None,
         "detail": {"directive": "offload", "bytes": 4096}},
        {"seq": 6, "time_s": now, "kind": "llm_request", "sandbox": "sb", "call_id": None,
         "detail": {"request_id": "q1", "context_tokens": 9000, "output_tokens": 12, "cached_tokens": 8000,
                    "start_s": now - 0.5, "end_s": now}},
    ]
    events, llm = [], []
    client = LogClient(log)
    source = DaemonEvents(client, "sb", lambda t, kind, **c: events.append((t, kind, c)), llm.append)
    source.step()                               # pages through the backlog in one step
    assert [a["seq"] for a in client.asked] == [0, 3, 6, 7] and source.kinds["freeze"] == 1
    # oom_kill is the profile's own eBPF's to record (not twice); the other sandbox's kill is not ours
    assert [(k, c["action"], c["call_id"]) for _, k, c in events] == [
        ("policy_action", "freeze", "tc-1"), ("policy_action", "thaw", "tc-1"), ("kv_decision", "offload", None)]
    assert events[2][2]["amount_bytes"] == 4096
    assert abs(events[0][0] - (time.time() - 2)) < 0.5          # monotonic -> epoch seconds
    (row,) = llm
    assert (row["request_id"], row["input_tokens"], row["cache_read_tokens"], row["usage_format"]) == \
        ("q1", 9000, 8000, "engine")
    assert abs(row["duration_s"] - 0.5) < 1e-6 and abs(row["time_s"] - (time.time() - 0.5)) < 0.5
