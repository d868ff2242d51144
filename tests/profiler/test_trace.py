"""The trace format: round trips, and readers that refuse what they cannot trust."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from agentcg.errors import TraceError
from agentcg.profiler.trace import (
    ADDED_COLUMNS, LLM_REQUEST_COLUMNS, MANIFEST, TOOLCALL_COLUMNS, TRACE_VERSION, Trace, frame, read_trace, write_trace)
from agentcg.records import ToolCallRecord

REPO_TRACES = Path(__file__).resolve().parents[2] / "traces"


def test_toolcall_columns_are_the_record_fields():
    assert TOOLCALL_COLUMNS[0] == "session_id"
    assert list(TOOLCALL_COLUMNS[1:]) == [f.name for f in dataclasses.fields(ToolCallRecord)]


@pytest.mark.parametrize("name", ["trace", "trace.zip"])
def test_round_trip(synthetic_trace, tmp_path, name):
    path = write_trace(synthetic_trace, tmp_path / name)
    back = read_trace(path)
    assert back.complete and back.source == "test"
    for table in ("sessions", "toolcalls", "samples", "llm_requests", "events"):
        assert back.table(table).equals(synthetic_trace.table(table)), table
    assert back.toolcalls.loc[back.toolcalls.call_id == "B", "oom_killed"].item() == True  # noqa: E712
    assert str(back.samples["memory_bytes"].dtype) == "Int64"


def test_unknown_version_is_refused(synthetic_trace, tmp_path):
    path = write_trace(synthetic_trace, tmp_path / "t")
    manifest = json.loads((path / MANIFEST).read_text())
    manifest["version"] = TRACE_VERSION + 1
    (path / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(TraceError, match=f"version {TRACE_VERSION + 1} is not supported"):
        read_trace(path)


def test_missing_column_is_named(synthetic_trace, tmp_path):
    path = write_trace(synthetic_trace, tmp_path / "t")
    table = pq.read_table(path / "samples.parquet").drop(["memory_bytes"])
    pq.write_table(table, path / "samples.parquet")
    with pytest.raises(TraceError, match="'samples' lacks column\\(s\\) memory_bytes"):
        read_trace(path)


def test_trace_before_the_added_columns_still_reads(synthetic_trace, tmp_path):
    """A version-1 trace written before ADDED_COLUMNS existed (like traces/*.zip): nulls there."""
    path = write_trace(synthetic_trace, tmp_path / "t")
    added = list(ADDED_COLUMNS["llm_requests"])
    pq.write_table(pq.read_table(path / "llm_requests.parquet").drop(added), path / "llm_requests.parquet")
    llm = read_trace(path).llm_requests
    assert list(llm.columns) == list(LLM_REQUEST_COLUMNS) and llm[added].isna().all().all()
    assert str(llm["cache_read_tokens"].dtype) == "Int64" and llm["input_tokens"].sum() == 3000
    for shipped in sorted(REPO_TRACES.glob("*.zip")):
        assert read_trace(shipped).llm_requests.columns.tolist() == list(LLM_REQUEST_COLUMNS)


def test_missing_table_and_non_traces(synthetic_trace, tmp_path):
    path = write_trace(synthetic_trace, tmp_path / "t")
    manifest = json.loads((path / MANIFEST).read_text())
    del manifest["tables"]["events"]
    (path / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(TraceError, match="'events' is missing"):
        read_trace(path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(TraceError, match="not an agentcg trace"):
        read_trace(tmp_path / "empty")
    (tmp_path / "junk.txt").write_text("x")
    with pytest.raises(TraceError, match="not a trace"):
        read_trace(tmp_path / "junk.txt")
    (path / "events.parquet").write_bytes(b"not parquet")
    manifest["tables"]["events"] = ["events.parquet"]
    (path / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(TraceError, match="'events' file events.parquet is not Parquet"):
        read_trace(path)


def test_write_refuses_a_foreign_directory(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "mine.txt").write_text("keep me")
    with pytest.raises(TraceError, match="not a trace"):
        write_trace(Trace.empty(), tmp_path / "d")
    assert (tmp_path / "d" / "mine.txt").read_text() == "keep me"


def test_empty_trace_keeps_its_schema(tmp_path):
    back = read_trace(write_trace(Trace.empty(), tmp_path / "t"))
    assert len(back.samples) == 0 and list(back.samples.columns) == list(frame("samples").columns)
