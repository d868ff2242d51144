"""The AgentCgroup importer on every published layout: session folders the tests write in
the real format (tests/agentcgroup_fixtures.py), the three published sessions of
../shared/datasets/agentcgroup-published-sample read in place (skipped without it), and
truncated or foreign files."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from agentcg.cli import main
from agentcg.errors import InvalidInput, TraceError
from agentcg.profiler.importers.agentcgroup import default_dataset_dir, import_agentcgroup
from agentcg.profiler.trace import read_trace

from agentcgroup_fixtures import T0, anthropic_session, local_session

SAMPLE = default_dataset_dir().parent / "agentcgroup-published-sample"


def uncached(llm) -> int:
    return int((llm.input_tokens - llm.cache_read_tokens.fillna(0) - llm.cache_creation_tokens.fillna(0)).sum())


@pytest.fixture
def published(tmp_path: Path) -> Path:
    """experiments/<set>/ as published: task A with two attempts (Anthropic usage, no end
    times in tool_calls.json), task B with one (llama.cpp usage, end times given)."""
    root = tmp_path / "set"
    anthropic_session().write_published(root / "taskA" / "attempt_1")
    anthropic_session(T0 + 100).write_published(root / "taskA" / "attempt_2")
    local_session().write_published(root / "taskB" / "attempt_1")
    return root


def test_attempt_folders_all_and_one(published):
    r = import_agentcgroup(published)
    assert [s.session_id for s in r.reports] == ["taskA/attempt_1", "taskA/attempt_2", "taskB/attempt_1"]
    assert (r.tasks, r.tool_calls, r.llm_requests, r.skipped) == (3, 7, 8, [])
    llm = r.trace.llm_requests.set_index("session_id")
    a1 = llm.loc["taskA/attempt_1"]
    assert int(a1.input_tokens.sum()) == 63816 and uncached(a1) == 30
    assert int(a1.cache_read_tokens.sum()) == 60883 and int(a1.cache_creation_tokens.sum()) == 2903
    assert int(a1.output_tokens.sum()) == 199 + 85 + 40          # the last line of each message id
    assert set(a1.usage_format) == {"anthropic"}
    b = llm.loc["taskB/attempt_1"]
    assert int(b.input_tokens.sum()) == 27299 and b.cache_read_tokens.isna().all()
    assert set(b.usage_format) == {"plain"}
    one = import_agentcgroup(published, attempt=2)
    assert [s.session_id for s in one.reports] == ["taskA/attempt_2"]
    assert [(s.task, s.reason) for s in one.skipped] == [("taskB", "no attempt_2 (it has attempt_1)")]


def test_missing_end_times_come_from_trace_jsonl(published):
    r = import_agentcgroup(published / "taskA" / "attempt_1")
    calls = r.trace.toolcalls.set_index("call_id")
    assert (calls.end_wall_s - calls.start_wall_s).round(3).to_dict() == {"toolu_0001": 1.0, "toolu_0002": 2.0}
    assert r.reports[0].ends_from_log == 2 and r.reports[0].ends_unknown == 0
    assert calls.loc["toolu_0002", "peak_memory_bytes"] == 170 * 1000**2   # samples at +5..+7 s
    (published / "taskA" / "attempt_1" / "trace.jsonl").unlink()
    r = import_agentcgroup(published / "taskA" / "attempt_1")     # no log: kept, end unknown
    assert r.reports[0].ends_unknown == 2 and r.trace.toolcalls.end_wall_s.isna().all()
    assert r.llm_requests == 0 and r.tasks_without_llm_log == 1


def test_flat_layouts_without_meta_json(tmp_path):
    root = tmp_path / "flat"
    anthropic_session().write_published(root / "t1")                          # results.json, no meta.json
    local_session().write_published(root / "t2", results=False)               # no metadata at all
    anthropic_session(end_in_calls=True).write_published(root / "t3", tool_calls=False, resources=False)
    r = import_agentcgroup(root)
    got = {s.session_id: (s.tool_calls, s.llm_requests, s.samples, s.sources["metadata"], s.sources["tool calls"],
                          s.sources["samples"]) for s in r.reports}
    assert got == {"t1": (2, 3, 30, "results.json", "tool_calls.json", "resources.json"),
                   "t2": (3, 2, 30, None, "tool_calls.json", "resources.json"),
                   "t3": (2, 3, 30, "results.json", "results.json", "results.json")}
    sessions = r.trace.sessions.set_index("session_id")
    assert sessions.loc["t1", "setup_s"] == 2.0 and sessions.loc["t1", "cpu_limit_cores"] == 2.0
    assert sessions.loc["t1", "memory_limit_bytes"] == 4 * 1024**3 and pd_isna(sessions.loc["t2", "setup_s"])
    # only trace.jsonl: the tool calls come from its tool_use blocks
    only_log = tmp_path / "log" / "t4"
    anthropic_session().write_published(only_log, results=False, resources=False, tool_calls=False)
    r = import_agentcgroup(only_log)
    assert (r.reports[0].sources["tool calls"], r.tool_calls, r.samples) == ("trace.jsonl", 2, 0)
    assert sorted(r.trace.toolcalls.tool) == ["Bash", "Read"] and r.trace.toolcalls.end_wall_s.notna().all()


def pd_isna(value) -> bool:
    import pandas as pd

    return bool(pd.isna(value))


def test_reshaped_copy_matches_published(tmp_path):
    s = local_session()
    pub = import_agentcgroup(s.write_published(tmp_path / "pub" / "t"))
    ours = import_agentcgroup(s.write_reshaped(tmp_path / "ours" / "t"))
    cols = ["request_id", "time_s", "input_tokens", "output_tokens"]
    assert pub.trace.llm_requests[cols].equals(ours.trace.llm_requests[cols])
    assert ours.reports[0].sources == {"metadata": "meta.json", "tool calls": "tool_calls.json",
                                       "samples": "resources.json", "llm": "llm_calls.json"}


def test_truncated_and_foreign_files_fail_per_task(published):
    a1, a2, b = published / "taskA" / "attempt_1", published / "taskA" / "attempt_2", published / "taskB" / "attempt_1"
    log = (a1 / "trace.jsonl").read_text()
    (a1 / "trace.jsonl").write_text(log[: len(log) - 40])                       # cut mid-line
    (a2 / "tool_calls.json").write_text(json.dumps({"calls": []}))             # a foreign shape
    (b / "trace.jsonl").write_text('{"event": "page_view", "url": "/"}\n')   # someone else's JSON lines
    with pytest.raises(TraceError, match="no task could be imported"):
        import_agentcgroup(published)
    anthropic_session().write_published(published / "taskC")
    r = import_agentcgroup(published)
    reasons = {s.task: s.reason for s in r.skipped}
    assert r.tasks == 1 and set(reasons) == {"taskA/attempt_1", "taskA/attempt_2", "taskB/attempt_1"}
    assert reasons["taskA/attempt_1"].startswith("trace.jsonl line 8: broken JSON")   # the last of 8
    assert "truncated" in reasons["taskA/attempt_1"]
    assert reasons["taskA/attempt_2"].startswith("tool_calls.json: expected a JSON list, got dict")
    assert "not an agent session log" in reasons["taskB/attempt_1"]
    assert r.skipped_tool_calls == 2 + 3     # the calls of the sessions whose tool_calls.json was readable


def test_implausible_context_is_flagged(tmp_path):
    s = anthropic_session()
    for line in s.lines:        # a writer that dropped the cache fields: input_tokens alone looks like context
        usage = line.get("message", {}).get("usage")
        if usage and line["message"]["id"] == "msg_0003":
            for key in ("cache_creation_input_tokens", "cache_read_input_tokens"):
                usage.pop(key)
    r = import_agentcgroup(s.write_published(tmp_path / "t"))
    assert len(r.flags) == 1 and "msg_0003: context 12 tokens, below 10% of the previous turn's 21,033" in r.flags[0]


def test_cli_per_task_lines_summary_and_exit(published, tmp_path, capsys):
    out = tmp_path / "trace"
    assert main(["import", "agentcgroup", str(published), "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert ("imported taskA/attempt_1: 2 tool calls (tool_calls.json, 2 end times from trace.jsonl), "
            "3 LLM requests (trace.jsonl, usage anthropic), 30 samples (resources.json), metadata results.json") \
        in printed
    assert ("summary: 3 sessions, 7 tool calls, 8 LLM requests, 90 samples; skipped 0 task(s) and 0 entries "
            "inside imported ones; 0 implausible value(s) flagged") in printed
    assert read_trace(out).llm_requests.cache_read_tokens.notna().sum() == 6
    (published / "taskB" / "attempt_1" / "resources.json").write_text("[1, 2")
    assert main(["import", "agentcgroup", str(published), "-o", str(out), "--force"]) == 1
    captured = capsys.readouterr()
    assert "agentcg: skipped taskB/attempt_1: resources.json: broken JSON" in captured.err
    assert "1 task(s) yielded nothing" in captured.err and "Traceback" not in captured.err
    assert len(read_trace(out).sessions) == 2
    assert main(["import", "agentcgroup", str(published), "-o", str(tmp_path / "t2"), "--attempt", "9"]) == 1
    assert "no task could be imported; first problem: taskA: no attempt_9" in capsys.readouterr().err
    assert main(["import", "agentcgroup", str(published), "-o", str(tmp_path / "t3"), "--attempt", "x"]) == 2


def test_empty_and_foreign_folders(tmp_path):
    (tmp_path / "d" / "notes").mkdir(parents=True)
    (tmp_path / "d" / "notes" / "todo.txt").write_text("x")
    with pytest.raises(TraceError, match="notes: holds no session files"):
        import_agentcgroup(tmp_path / "d")
    (tmp_path / "e").mkdir()
    with pytest.raises(InvalidInput, match="no task folders"):
        import_agentcgroup(tmp_path / "e")


@pytest.fixture(scope="module")
def sample_dir() -> Path:
    if not (SAMPLE / "pilot_haiku_small").is_dir():
        pytest.skip(f"published sample not found at {SAMPLE} (set AGENTCG_DATASETS)")
    return SAMPLE


def test_published_sample_counts(sample_dir):
    """The README of the published sample: tool calls / LLM requests / context / input_tokens alone."""
    r = import_agentcgroup(sample_dir)
    llm, calls = r.trace.llm_requests, r.trace.toolcalls
    got = {sid: (int((calls.session_id == sid).sum()), len(g), int(g.input_tokens.sum()), uncached(g))
           for sid, g in llm.groupby("session_id")}
    assert got == {"all_images_local/Azure__azure-cli-4265/attempt_1": (8, 9, 143076, 143076),
                   "all_images_local/python-control__python-control-525/attempt_1": (9, 9, 173867, 173867),
                   "pilot_haiku_small/pilotA_r1/attempt_1": (1, 2, 41816, 18)}
    assert r.skipped == [] and r.flags == []


def test_published_sample_without_end_times(sample_dir, tmp_path):
    """The published sets that leave end_timestamp out: each call ends at its tool_result."""
    task = tmp_path / "Azure__azure-cli-4265"
    shutil.copytree(sample_dir / "all_images_local" / "Azure__azure-cli-4265", task)
    before = import_agentcgroup(task).trace.toolcalls.set_index("call_id").end_wall_s
    path = task / "attempt_1" / "tool_calls.json"
    path.write_text(json.dumps([{k: v for k, v in c.items() if k != "end_timestamp"}
                                for c in json.loads(path.read_text())]))
    r = import_agentcgroup(task)
    after = r.trace.toolcalls.set_index("call_id").end_wall_s
    assert r.reports[0].ends_from_log == 8 and after.round(3).equals(before.round(3))
