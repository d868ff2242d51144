"""The agentcg trace: five Parquet tables plus a JSON manifest, versioned.

A trace is a directory (`trace.json` + `<table>.parquet`, or several part files per
table while a recorder is still writing) or a single `.zip` file holding the same.
Times are epoch seconds (UTC) in columns named `*_s`, sizes are bytes in `*_bytes`.
See docs/trace-format.md for the meaning of every column.

Readers reject an unknown version, a missing table or a missing column with
`TraceError`; extra columns are kept (a newer writer may add some), and the columns
added to version 1 since its first release (ADDED_COLUMNS) are filled with nulls when
an older trace lacks them.
"""
from __future__ import annotations

import dataclasses
import io
import json
import os
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Callable

from agentcg.errors import TraceError

if TYPE_CHECKING:
    import pandas as pd

TRACE_FORMAT = "agentcg-trace"
TRACE_VERSION = 1
MANIFEST = "trace.json"

# Event kinds written by agentcg; readers must accept others.
EVENT_OOM_KILL = "oom_kill"              # the kernel's OOM killer chose a process of the session
EVENT_RECLAIM_STALL = "reclaim_stall"    # a process stalled in direct reclaim (amount: none; detail: s)
EVENT_POLICY_ACTION = "policy_action"    # action = freeze, thaw, throttle, kill, admit_wait, admit, ...
EVENT_KV_DECISION = "kv_decision"        # a KV directive of an engine link (action = the directive)

# Column -> pandas dtype. "string" columns hold text, "Int64"/"boolean" are nullable.
SESSION_SCHEMA: dict[str, str] = {
    "session_id": "string", "sandbox": "string", "source": "string",
    "start_s": "float64", "end_s": "float64",     # first and last observation
    "setup_s": "float64",                          # before start_s: pull, permissions, cgroup setup
    "untraced_s": "float64",                       # known to have run but not observed
    "memory_limit_bytes": "Int64", "cpu_limit_cores": "float64",
    "agent": "string", "model": "string", "image": "string",
    "metadata": "string",                          # JSON object: the rest of the source's metadata
}
TOOLCALL_SCHEMA: dict[str, str] = {
    "session_id": "string",
    # the fields of agentcg.records.ToolCallRecord, in order
    "sandbox": "string", "call_id": "string", "tool": "string", "command": "string",
    "start_monotonic_s": "float64", "start_wall_s": "float64",
    "end_monotonic_s": "float64", "end_wall_s": "float64",
    "exit_code": "Int64", "signal": "Int64", "oom_killed": "boolean", "priority": "string",
    "mem_hint_bytes": "Int64", "peak_memory_bytes": "Int64", "peak_rss_bytes": "Int64",
    "cpu_s": "float64", "runq_latency_p50_s": "float64", "runq_latency_p99_s": "float64",
    "page_faults": "Int64", "reclaim_stall_s": "float64",
    "block_read_bytes": "Int64", "block_write_bytes": "Int64", "processes": "Int64",
    "policy_action": "string", "message": "string", "version": "Int64",
    "extra": "string",                             # JSON object
}
SAMPLE_SCHEMA: dict[str, str] = {
    "session_id": "string", "sandbox": "string",
    "scope": "string",                             # "sandbox" (whole sandbox) or "toolcall" (its cgroup)
    "call_id": "string",                           # tool call running at time_s; null = agent/LLM time
    "time_s": "float64",
    "memory_bytes": "Int64", "memory_limit_bytes": "Int64", "cpu_cores": "float64",
    "psi_cpu_some_total_s": "float64", "psi_memory_some_total_s": "float64",
    "psi_memory_full_total_s": "float64", "psi_io_some_total_s": "float64",
    "gpu_memory_bytes": "Int64", "gpu_util_pct": "float64",
}
LLM_REQUEST_SCHEMA: dict[str, str] = {
    "session_id": "string", "request_id": "string", "time_s": "float64", "model": "string",
    "input_tokens": "Int64",                       # the whole context the engine saw
    "output_tokens": "Int64", "is_sidechain": "boolean",
    "duration_s": "float64",
    "cache_read_tokens": "Int64",                  # of input_tokens, read from a prompt cache
    "cache_creation_tokens": "Int64",              # of input_tokens, written to a prompt cache
    "usage_format": "string",                      # how the source counted: "anthropic", "plain", ...
}
EVENT_SCHEMA: dict[str, str] = {
    "session_id": "string", "time_s": "float64", "kind": "string", "call_id": "string",
    "action": "string", "amount_bytes": "Int64", "detail": "string",
}
SCHEMAS: dict[str, dict[str, str]] = {
    "sessions": SESSION_SCHEMA, "toolcalls": TOOLCALL_SCHEMA, "samples": SAMPLE_SCHEMA,
    "llm_requests": LLM_REQUEST_SCHEMA, "events": EVENT_SCHEMA,
}
TABLES: tuple[str, ...] = tuple(SCHEMAS)
# Columns added to version 1 after its first release: a trace written before lacks them and
# reads with nulls there (not measured), so adding them needed no version bump.
ADDED_COLUMNS: dict[str, tuple[str, ...]] = {
    "llm_requests": ("cache_read_tokens", "cache_creation_tokens", "usage_format"),
}
SESSION_COLUMNS = tuple(SESSION_SCHEMA)
TOOLCALL_COLUMNS = tuple(TOOLCALL_SCHEMA)
SAMPLE_COLUMNS = tuple(SAMPLE_SCHEMA)
LLM_REQUEST_COLUMNS = tuple(LLM_REQUEST_SCHEMA)
EVENT_COLUMNS = tuple(EVENT_SCHEMA)


@dataclass
class Trace:
    sessions: "pd.DataFrame"
    toolcalls: "pd.DataFrame"
    samples: "pd.DataFrame"
    llm_requests: "pd.DataFrame"
    events: "pd.DataFrame"
    source: str = "agentcg"
    created_s: float = field(default_factory=time.time)
    complete: bool = True                      # False: a recorder stopped before close()
    notes: dict[str, Any] = field(default_factory=dict)

    def table(self, name: str) -> "pd.DataFrame":
        return getattr(self, name)

    @classmethod
    def empty(cls, source: str = "agentcg") -> "Trace":
        return cls(**{name: frame(name) for name in TABLES}, source=source)


def frame(table: str, rows: list[dict[str, Any]] | None = None,
          columns: dict[str, Any] | None = None) -> "pd.DataFrame":
    """A DataFrame of `table`'s schema from row dicts or from column sequences of equal
    length; absent keys and columns become null."""
    import pandas as pd

    schema = SCHEMAS[table]
    if columns is not None:
        length = len(next(iter(columns.values()))) if columns else 0
        data = {col: columns[col] if col in columns else [None] * length for col in schema}
    else:
        data = {col: [row.get(col) for row in rows or ()] for col in schema}
    return pd.DataFrame({col: pd.array(values, dtype=schema[col]) for col, values in data.items()})


def conform(table: str, df: "pd.DataFrame", where: str = "trace") -> "pd.DataFrame":
    """Check `df` has every column of `table` and cast them; extra columns are kept last."""
    schema = SCHEMAS[table]
    added = [col for col in ADDED_COLUMNS.get(table, ()) if col not in df.columns]
    if added:
        import pandas as pd

        df = df.assign(**{col: pd.array([None] * len(df), dtype=schema[col]) for col in added})
    missing = [col for col in schema if col not in df.columns]
    if missing:
        raise TraceError(
            f"{where}: table {table!r} lacks column(s) {', '.join(missing)}; "
            f"it was written by another tool or an incompatible agentcg version"
        )
    extra = [col for col in df.columns if col not in schema]
    try:
        cast = df.astype({col: dtype for col, dtype in schema.items()
                          if str(df[col].dtype) != dtype})
    except (TypeError, ValueError) as exc:
        raise TraceError(f"{where}: table {table!r} has a column of the wrong type: {exc}") from None
    return cast[list(schema) + extra].reset_index(drop=True)


def toolcall_row(session_id: str, record: Any) -> dict[str, Any]:
    """A toolcalls-table row from an agentcg.records.ToolCallRecord."""
    row = dataclasses.asdict(record)
    row["extra"] = json.dumps(row.get("extra") or {}, sort_keys=True)
    row["session_id"] = session_id
    return row


def manifest_dict(trace_source: str, created_s: float, complete: bool,
                  files: dict[str, list[str]], notes: dict[str, Any]) -> dict[str, Any]:
    return {"format": TRACE_FORMAT, "version": TRACE_VERSION, "source": trace_source,
            "created_s": created_s, "complete": complete, "tables": files, "notes": notes}


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as fh:
        json.dump(data, fh, indent=1, sort_keys=True)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def parquet_bytes(table: str, df: "pd.DataFrame") -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    arrow = pa.Table.from_pandas(conform(table, df, "write"), preserve_index=False)
    arrow = arrow.replace_schema_metadata({**(arrow.schema.metadata or {}),
                                           b"agentcg.trace.version": str(TRACE_VERSION).encode(),
                                           b"agentcg.trace.table": table.encode()})
    sink = io.BytesIO()
    pq.write_table(arrow, sink, compression="zstd")
    return sink.getvalue()


def write_file_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def write_trace(trace: Trace, path: str | Path) -> Path:
    """Write `trace` as a directory, or as one file when `path` ends in `.zip`."""
    path = Path(path)
    files = {name: [f"{name}.parquet"] for name in TABLES}
    manifest = manifest_dict(trace.source, trace.created_s, trace.complete, files, trace.notes)
    blobs = {f"{name}.parquet": parquet_bytes(name, trace.table(name)) for name in TABLES}
    if path.suffix == ".zip":
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as zf:
            zf.writestr(MANIFEST, json.dumps(manifest, indent=1, sort_keys=True))
            for name, blob in blobs.items():
                zf.writestr(name, blob)
        os.replace(tmp, path)
        return path
    if path.exists() and not path.is_dir():
        raise TraceError(f"{path}: exists and is not a directory; pick another trace path or add .zip")
    if path.is_dir() and any(path.iterdir()) and not (path / MANIFEST).exists():
        raise TraceError(f"{path}: a non-empty directory that is not a trace; refusing to write into it")
    path.mkdir(parents=True, exist_ok=True)
    for name, blob in blobs.items():
        write_file_atomic(path / name, blob)
    write_json_atomic(path / MANIFEST, manifest)
    return path


def read_trace(path: str | Path) -> Trace:
    """Read a trace directory or `.zip`; TraceError says what is wrong with it."""
    path = Path(path)
    if path.is_dir():
        return _read(path, lambda name: open(path / name, "rb"))
    if path.is_file() and zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            return _read(path, archive.open)
    if path.exists():
        raise TraceError(f"{path}: not a trace (expected a directory with {MANIFEST} or a .zip)")
    raise TraceError(f"{path}: no such trace")


def _read(path: Path, opener: Callable[[str], IO[bytes]]) -> Trace:
    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        with opener(MANIFEST) as fh:
            manifest = json.load(fh)
    except (OSError, KeyError):
        raise TraceError(f"{path}: no {MANIFEST}; this is not an agentcg trace") from None
    except json.JSONDecodeError as exc:
        raise TraceError(f"{path}/{MANIFEST}: not valid JSON ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != TRACE_FORMAT:
        raise TraceError(f"{path}/{MANIFEST}: format is not {TRACE_FORMAT!r}")
    version = manifest.get("version")
    if version != TRACE_VERSION:
        raise TraceError(
            f"{path}: trace version {version!r} is not supported (this agentcg reads version "
            f"{TRACE_VERSION}); convert it with the agentcg that wrote it"
        )
    files = manifest.get("tables") or {}
    tables: dict[str, pd.DataFrame] = {}
    for name in TABLES:
        if name not in files:
            raise TraceError(f"{path}: table {name!r} is missing from {MANIFEST}")
        parts = []
        for file_name in files[name]:
            try:
                with opener(file_name) as fh:
                    parts.append(pq.read_table(fh).to_pandas())
            except (OSError, KeyError) as exc:
                raise TraceError(f"{path}: table {name!r} file {file_name} is unreadable: {exc}") from None
            except pa.ArrowException as exc:
                raise TraceError(f"{path}: table {name!r} file {file_name} is not Parquet: {exc}") from None
        parts = [conform(name, p, str(path)) for p in parts if len(p)]
        tables[name] = conform(name, pd.concat(parts, ignore_index=True), str(path)) if parts else frame(name)
    # a recorder re-adds a call when it ends and a session when it ends: the last row wins
    tables["toolcalls"] = tables["toolcalls"].drop_duplicates(
        ["session_id", "call_id"], keep="last").reset_index(drop=True)
    tables["sessions"] = tables["sessions"].drop_duplicates(
        ["session_id"], keep="last").reset_index(drop=True)
    return Trace(**tables, source=str(manifest.get("source", "unknown")),
                 created_s=float(manifest.get("created_s") or 0.0),
                 complete=bool(manifest.get("complete", False)), notes=manifest.get("notes") or {})
