"""TraceRecorder: writes a trace while it is being recorded, so a stop loses nothing.

Rows are buffered and flushed every `flush_interval_s` (checked on each add, no
thread) as Parquet part files; the manifest lists only parts that were completely
written (each file and the manifest are replaced atomically), so a trace read after
SIGKILL holds everything up to the last flush and is marked `complete=False`.
`stop_on_signals()` turns SIGTERM/SIGINT into an exception so that a `with
TraceRecorder(...)` block unwinds and `close()` writes the final tables: nothing
recorded before the signal is lost. close() merges the parts into one file per table.
"""
from __future__ import annotations

import contextlib
import signal
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Iterator

from agentcg.errors import InvalidInput, TraceError
from agentcg.profiler import trace as tr
from agentcg.records import ToolCallRecord

PARTS_DIR = "parts"
MAX_PARTS_PER_TABLE = 32      # more are merged into one, to bound the file count


class TraceRecorder:
    def __init__(self, path: str | Path, *, source: str = "agentcg", flush_interval_s: float = 2.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.path = Path(path)
        if self.path.exists() and (not self.path.is_dir() or any(self.path.iterdir())):
            raise TraceError(f"{self.path}: already exists; record into a new path")
        (self.path / PARTS_DIR).mkdir(parents=True)
        self.source = source
        self.created_s = time.time()
        self.flush_interval_s = flush_interval_s
        self._clock = clock
        self._last_flush = clock()
        self._pending: dict[str, list[dict[str, Any]]] = {name: [] for name in tr.TABLES}
        self._parts: dict[str, list[str]] = {name: [] for name in tr.TABLES}
        self._sessions: dict[str, dict[str, Any]] = {}
        self._seq = 0
        self.closed = False
        # pandas and pyarrow load here, not at the first flush: on a busy host that import
        # takes seconds, which would be a gap in a live recording's samples
        import pandas  # noqa: F401
        import pyarrow.parquet  # noqa: F401

        self._write_manifest(complete=False)

    # -- adding rows -------------------------------------------------------------
    def add_session(self, session_id: str, sandbox: str, start_s: float, **columns: Any) -> None:
        """Add or update a session; later calls for the same id update its columns."""
        row = {**self._sessions.get(session_id, {}), **columns,
               "session_id": session_id, "sandbox": sandbox, "start_s": start_s}
        self._sessions[session_id] = row
        self._add("sessions", row)

    def end_session(self, session_id: str, end_s: float) -> None:
        if session_id not in self._sessions:
            raise InvalidInput(f"end_session: unknown session {session_id!r}; call add_session first")
        self._sessions[session_id]["end_s"] = end_s
        self._add("sessions", dict(self._sessions[session_id]))

    def add_toolcall(self, session_id: str, record: ToolCallRecord) -> None:
        """Add a tool call; add it again when it ends (the last row of a call_id wins)."""
        self._add("toolcalls", tr.toolcall_row(session_id, record))

    def add_sample(self, session_id: str, sandbox: str, time_s: float, **columns: Any) -> None:
        self._add("samples", {**columns, "session_id": session_id, "sandbox": sandbox, "time_s": time_s})

    def add_llm_request(self, session_id: str, time_s: float, **columns: Any) -> None:
        self._add("llm_requests", {**columns, "session_id": session_id, "time_s": time_s})

    def add_event(self, session_id: str, time_s: float, kind: str, **columns: Any) -> None:
        self._add("events", {**columns, "session_id": session_id, "time_s": time_s, "kind": kind})

    def _add(self, table: str, row: dict[str, Any]) -> None:
        if self.closed:
            raise TraceError(f"{self.path}: recorder is closed")
        unknown = set(row) - set(tr.SCHEMAS[table])
        if unknown:
            raise InvalidInput(f"{table}: unknown column(s) {', '.join(sorted(unknown))}; "
                               f"see agentcg.profiler.trace.{table.upper()}_SCHEMA")
        self._pending[table].append(row)
        if self._clock() - self._last_flush >= self.flush_interval_s:
            self.flush()

    # -- writing -----------------------------------------------------------------
    def flush(self) -> None:
        """Write what is buffered as part files; after this returns it survives SIGKILL."""
        with _signals_deferred():
            self._flush()

    def _flush(self) -> None:
        self._last_flush = self._clock()
        changed = False
        for table, rows in self._pending.items():
            if not rows:
                continue
            self._write_part(table, tr.frame(table, rows))
            self._pending[table] = []
            changed = True
        if changed:
            self._write_manifest(complete=False)
            self._compact()

    def close(self) -> Path:
        """Merge everything into one Parquet file per table and mark the trace complete."""
        with _signals_deferred():
            return self._close()

    def _close(self) -> Path:
        if self.closed:
            return self.path
        self._flush()
        final = {name: [f"{name}.parquet"] for name in tr.TABLES}
        for name in tr.TABLES:
            tr.write_file_atomic(self.path / f"{name}.parquet", tr.parquet_bytes(name, self._merged(name)))
        self._parts = final
        self._write_manifest(complete=True)
        shutil.rmtree(self.path / PARTS_DIR, ignore_errors=True)
        self.closed = True
        return self.path

    def __enter__(self) -> "TraceRecorder":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _write_part(self, table: str, df: Any) -> None:
        self._seq += 1
        name = f"{PARTS_DIR}/{table}-{self._seq:06d}.parquet"
        tr.write_file_atomic(self.path / name, tr.parquet_bytes(table, df))
        self._parts[table].append(name)

    def _merged(self, table: str) -> Any:
        import pandas as pd
        import pyarrow.parquet as pq

        frames = [pq.read_table(self.path / name).to_pandas() for name in self._parts[table]]
        frames = [f for f in frames if len(f)]
        return pd.concat(frames, ignore_index=True) if frames else tr.frame(table)

    def _compact(self) -> None:
        for table, parts in self._parts.items():
            if len(parts) <= MAX_PARTS_PER_TABLE:
                continue
            merged, old = self._merged(table), list(parts)
            self._parts[table] = []
            self._write_part(table, merged)
            self._write_manifest(complete=False)   # the manifest switches to the merged part first
            for name in old:
                (self.path / name).unlink(missing_ok=True)

    def _write_manifest(self, complete: bool) -> None:
        manifest = tr.manifest_dict(self.source, self.created_s, complete,
                                    {k: list(v) for k, v in self._parts.items()}, {})
        tr.write_json_atomic(self.path / tr.MANIFEST, manifest)


class Stopped(SystemExit):
    """Raised in the main thread by SIGTERM/SIGINT under stop_on_signals()."""


# A signal that lands while a flush or close is writing is held until the write ends,
# so a part file and the rows it holds never disagree.
_critical_depth = 0
_deferred_signals: list[int] = []


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    global _critical_depth
    _critical_depth += 1
    try:
        yield
    finally:
        _critical_depth -= 1
    if _critical_depth == 0 and _deferred_signals:
        raise Stopped(128 + _deferred_signals.pop())


@contextlib.contextmanager
def stop_on_signals(signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT)) -> Iterator[None]:
    """Make SIGTERM/SIGINT raise Stopped(128+signum) so `with` blocks unwind and close."""
    def handler(signum: int, _frame: object) -> None:
        if _critical_depth:
            _deferred_signals[:] = [signum]
            return
        raise Stopped(128 + signum)

    previous = {sig: signal.signal(sig, handler) for sig in signals}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
