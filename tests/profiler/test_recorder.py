"""TraceRecorder durability: a real child process records, is signalled, and the
trace is read back."""
from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from agentcg.errors import InvalidInput, TraceError
from agentcg.profiler.recorder import MAX_PARTS_PER_TABLE, PARTS_DIR, TraceRecorder
from agentcg.profiler.report import build_report
from agentcg.profiler.trace import read_trace
from agentcg.records import ToolCallRecord

CHILD = textwrap.dedent("""
    import sys, time
    from agentcg.profiler.recorder import TraceRecorder, stop_on_signals
    from agentcg.records import ToolCallRecord
    path, flush_s = sys.argv[1], float(sys.argv[2])
    with stop_on_signals(), TraceRecorder(path, flush_interval_s=flush_s) as rec:
        rec.add_session("s1", "box", time.time())
        i = 0
        while True:
            rec.add_sample("s1", "box", time.time(), scope="sandbox", memory_bytes=i)
            if i % 10 == 0:
                rec.add_toolcall("s1", ToolCallRecord("box", f"c{i}", "Bash", "true", 1.0, 2.0))
            i += 1
            print(i, flush=True)
            time.sleep(0.002)
""")


def record_then_signal(path: Path, flush_s: float, sig: int, rows: int) -> tuple[int, int]:
    """Run the child until it has added `rows` samples, signal it; (rows seen, exit code)."""
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(path), str(flush_s)],
                             stdout=subprocess.PIPE, text=True)
    seen = 0
    try:
        for line in child.stdout:
            seen = int(line)
            if seen >= rows:
                break
        child.send_signal(sig)
        child.stdout.read()
        return seen, child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        child.stdout.close()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_loses_nothing(tmp_path, sig):
    """No periodic flush at all (60 s): only the close() on the signal can save the rows."""
    seen, code = record_then_signal(tmp_path / "t", 60.0, sig, rows=300)
    assert code == 128 + sig
    trace = read_trace(tmp_path / "t")
    assert trace.complete
    assert len(trace.samples) >= seen
    assert trace.samples["memory_bytes"].tolist() == list(range(len(trace.samples)))
    assert len(trace.toolcalls) == (len(trace.samples) + 9) // 10
    assert not (tmp_path / "t" / PARTS_DIR).exists()


def test_sigkill_keeps_everything_flushed(tmp_path):
    """Flush on every add; SIGKILL cannot be caught, yet every row printed was flushed."""
    seen, code = record_then_signal(tmp_path / "t", 0.0, signal.SIGKILL, rows=80)
    assert code == -signal.SIGKILL
    trace = read_trace(tmp_path / "t")
    assert not trace.complete
    assert len(trace.samples) >= seen
    assert trace.samples["memory_bytes"].tolist() == list(range(len(trace.samples)))
    assert len(list((tmp_path / "t" / PARTS_DIR).glob("samples-*.parquet"))) <= MAX_PARTS_PER_TABLE + 1
    # the session never ended, yet it can be reported: its last observation ends it
    session = build_report(trace).sessions[0]
    assert session.memory.samples == len(trace.samples) and session.wall.traced_s > 0


def test_toolcall_and_session_updates_keep_the_last_row(tmp_path):
    record = ToolCallRecord("box", "c1", "Bash", "sleep 1", 1.0, 100.0)
    with TraceRecorder(tmp_path / "t", flush_interval_s=0.0) as rec:
        rec.add_session("s1", "box", 100.0, agent="test")
        rec.add_toolcall("s1", record)
        record.end_monotonic_s, record.end_wall_s, record.exit_code = 2.0, 101.0, 0
        rec.add_toolcall("s1", record)
        rec.end_session("s1", 102.0)
    trace = read_trace(tmp_path / "t")
    assert len(trace.toolcalls) == 1 and trace.toolcalls.exit_code.item() == 0
    assert len(trace.sessions) == 1
    assert trace.sessions.iloc[0][["end_s", "agent"]].tolist() == [102.0, "test"]


def test_bad_use_is_refused(tmp_path):
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "x").write_text("")
    with pytest.raises(TraceError, match="already exists"):
        TraceRecorder(tmp_path / "used")
    rec = TraceRecorder(tmp_path / "t")
    with pytest.raises(InvalidInput, match="unknown column\\(s\\) memory_mb"):
        rec.add_sample("s1", "box", 1.0, memory_mb=3)
    with pytest.raises(InvalidInput, match="unknown session"):
        rec.end_session("nope", 1.0)
    rec.close()
    with pytest.raises(TraceError, match="closed"):
        rec.add_event("s1", 1.0, "oom_kill")
