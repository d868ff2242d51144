"""The AgentCgroup importer on the real dataset (read in place) and on corrupted copies
of three of its task folders."""
from __future__ import annotations

import json

import pytest

from agentcg.errors import InvalidInput, TraceError
from agentcg.profiler.importers.agentcgroup import import_agentcgroup
from agentcg.profiler.report import build_report

MB = 1000**2


@pytest.fixture(scope="module")
def full_import(dataset_dir):
    return import_agentcgroup(dataset_dir)


def test_dataset_counts(full_import):
    r = full_import
    assert (r.tasks, r.skipped, r.tool_calls, r.llm_requests) == (113, [], 6641, 5643)
    assert {t: r.tool_counts[t] for t in ("Bash", "Read", "Edit", "Grep", "TodoWrite", "Glob")} == {
        "Bash": 3347, "Read": 1286, "Edit": 655, "Grep": 535, "TodoWrite": 515, "Glob": 222}
    assert r.tasks_without_llm_log == 2
    llm = r.trace.llm_requests
    assert llm["input_tokens"].median() == 42136 and llm["input_tokens"].max() == 127260


def test_pydicom_peak_to_mean(full_import):
    trace = full_import.trace
    report = build_report(trace)
    session = next(s for s in report.sessions if s.session_id == "pydicom__pydicom-2065")
    assert session.memory.peak_bytes == 2041 * MB
    assert session.memory.mean_bytes == pytest.approx(181.06 * MB, rel=1e-3)
    assert session.memory.peak_to_mean == pytest.approx(11.27, abs=0.01)
    assert report.aggregate.peak_to_mean_max_session == "pydicom__pydicom-2065"
    # the 2,041 MB sample fell inside a pytest run: attributed to that Bash call
    samples = trace.samples[trace.samples.session_id == "pydicom__pydicom-2065"]
    peak_call = samples.loc[samples.memory_bytes.astype(float).idxmax(), "call_id"]
    calls = trace.toolcalls.set_index("call_id")
    assert calls.loc[peak_call, "tool"] == "Bash" and "pytest" in calls.loc[peak_call, "command"]
    assert calls.loc[peak_call, "peak_memory_bytes"] == 2041 * MB


def test_times_are_aligned(full_import):
    trace = full_import.trace
    s = trace.sessions.set_index("session_id").loc["pydicom__pydicom-2065"]
    meta = json.loads(s["metadata"])
    assert meta["tz_offset_s"] == 8 * 3600    # meta/resources timestamps were local UTC-8
    calls = trace.toolcalls[trace.toolcalls.session_id == "pydicom__pydicom-2065"]
    # tool calls (UTC ISO) fall inside the epoch-sampled span, not 8 h away from it
    assert s.start_s <= calls.start_wall_s.min() and calls.end_wall_s.max() <= s.end_s
    assert s.end_s - s.start_s == pytest.approx(605, abs=2)
    assert s.setup_s == pytest.approx(0.9393 + 18.3004, abs=1e-3)
    assert meta["meta_start_s"] < s.start_s < meta["meta_start_s"] + meta["total_time"]


def test_samples_are_attributed_to_the_running_call(full_import):
    trace = full_import.trace
    calls = trace.toolcalls.set_index("call_id")
    attributed = trace.samples[trace.samples.call_id.notna()].head(500)
    for sample in attributed.itertuples():
        call = calls.loc[sample.call_id]
        assert call.start_wall_s <= sample.time_s <= call.end_wall_s
    assert 0.2 < trace.samples.call_id.notna().mean() < 0.6


def corrupt(dataset, task, file, edit):
    path = dataset / task / file
    path.write_text(edit(path.read_text()))


def test_malformed_tasks_are_reported_and_skipped(small_dataset):
    tasks = sorted(p.name for p in small_dataset.iterdir())
    calls_in = {t: len(json.loads((small_dataset / t / "tool_calls.json").read_text())) for t in tasks}
    corrupt(small_dataset, tasks[0], "tool_calls.json", lambda text: text[: len(text) // 2])
    (small_dataset / tasks[1] / "resources.json").write_text("[]")
    result = import_agentcgroup(small_dataset)
    assert result.tasks == 1 and [s.task for s in result.skipped] == tasks[:2]
    assert "broken JSON" in result.skipped[0].reason
    assert result.skipped[1].reason.startswith("resources.json: expected a JSON object, got list")
    assert result.skipped_tool_calls == calls_in[tasks[1]]   # the broken file cannot be counted
    assert result.tool_calls == calls_in[tasks[2]] == len(result.trace.toolcalls)
    assert set(result.trace.sessions.session_id) == set(result.trace.samples.session_id) == {tasks[2]}


def test_missing_resources_keeps_calls_without_samples(small_dataset):
    task = sorted(p.name for p in small_dataset.iterdir())[0]
    (small_dataset / task / "resources.json").unlink()
    result = import_agentcgroup(small_dataset)
    assert result.tasks == 3 and not result.skipped
    report = next(r for r in result.reports if r.session_id == task)
    assert report.samples == 0 and report.sources["samples"] is None and report.tool_calls > 0
    assert "0 samples (none)" in report.line()
    assert task not in set(result.trace.samples.session_id)
    assert result.trace.toolcalls[result.trace.toolcalls.session_id == task].peak_memory_bytes.isna().all()


def test_unknown_memory_unit_skips_the_task(small_dataset):
    task = sorted(p.name for p in small_dataset.iterdir())[0]
    corrupt(small_dataset, task, "resources.json", lambda text: text.replace("MB /", "XB /", 1))
    result = import_agentcgroup(small_dataset)
    assert result.tasks == 2 and result.skipped[0].task == task
    assert "unknown unit 'XB'" in result.skipped[0].reason


def test_units_and_naive_timestamps(small_dataset):
    task = sorted(p.name for p in small_dataset.iterdir())[0]
    path = small_dataset / task / "resources.json"
    data = json.loads(path.read_text())
    data["samples"][0]["mem_usage"] = "1.5GiB / 2kB"
    data["samples"][1]["mem_usage"] = "512KiB / 1GB"
    path.write_text(json.dumps(data))
    trace = import_agentcgroup(small_dataset).trace
    first = trace.samples[trace.samples.session_id == task].head(2)
    assert first.memory_bytes.tolist() == [int(1.5 * 1024**3), 512 * 1024]
    assert first.memory_limit_bytes.tolist() == [2000, 1000**3]
    corrupt(small_dataset, task, "tool_calls.json", lambda text: text.replace("Z\"", "\"", 1))
    result = import_agentcgroup(small_dataset)
    assert "has no time zone" in result.skipped[0].reason


def test_nothing_importable(tmp_path, small_dataset):
    (tmp_path / "empty").mkdir()
    with pytest.raises(InvalidInput, match="no task folders"):
        import_agentcgroup(tmp_path / "empty")
    with pytest.raises(InvalidInput, match="not a directory"):
        import_agentcgroup(tmp_path / "absent")
    for task in small_dataset.iterdir():
        for name in ("tool_calls.json", "resources.json", "llm_calls.json"):
            (task / name).unlink(missing_ok=True)
    with pytest.raises(TraceError, match="no task could be imported.*nothing to import: no tool calls, "
                                         "LLM requests or resource samples in meta.json"):
        import_agentcgroup(small_dataset)



def test_cli_on_the_shared_dataset(dataset_dir, tmp_path, capsys):
    """`agentcg import agentcgroup` on the reshaped copy, as a user runs it."""
    from agentcg.cli import main

    assert main(["import", "agentcgroup", str(dataset_dir), "-q", "-o", str(tmp_path / "t.zip")]) == 0
    out = capsys.readouterr().out
    assert "tasks: 113 imported, 0 skipped" in out
    assert not [line for line in out.splitlines() if line.startswith("imported ")]     # -q
    assert ("summary: 113 sessions, 6641 tool calls, 5643 LLM requests, 51080 samples; skipped 0 task(s) "
            "and 0 entries inside imported ones; 0 implausible value(s) flagged") in out
