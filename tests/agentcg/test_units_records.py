"""Units and the tool-call record: the types every part passes around."""
import json

import pytest

from agentcg.errors import InvalidInput
from agentcg.records import ToolCallRecord, truncate_command
from agentcg.units import format_bytes, parse_duration, parse_size


@pytest.mark.parametrize("text, expected", [
    ("4096", 4096), ("300M", 300 * 2**20), ("1.5GiB", int(1.5 * 2**30)), ("185.5MB", 185_500_000),
    ("11.76MB", 11_760_000), ("2kB", 2000), ("64KiB", 65536), ("0", 0), (1024, 1024),
])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "abc", "-5M", "5 potatoes", "1.2.3G", True, -1])
def test_parse_size_refuses(text):
    with pytest.raises(InvalidInput):
        parse_size(text)


@pytest.mark.parametrize("text, expected", [("100ms", 0.1), ("2s", 2.0), ("1.5", 1.5), ("5min", 300.0),
                                            ("250us", 250e-6), (3, 3.0)])
def test_parse_duration(text, expected):
    assert parse_duration(text) == pytest.approx(expected)


@pytest.mark.parametrize("text", ["fast", "-1s", "10 parsecs", float("nan")])
def test_parse_duration_refuses(text):
    with pytest.raises(InvalidInput):
        parse_duration(text)


def test_format_bytes():
    assert format_bytes(1536) == "1.5 KiB"
    assert format_bytes(300 * 2**20) == "300 MiB"
    assert format_bytes(12) == "12 B"


def test_record_round_trips_and_derives_outcome():
    record = ToolCallRecord(sandbox="s1", call_id="c1", tool="pytest", command="pytest -x",
                            start_monotonic_s=10.0, start_wall_s=1.7e9, end_monotonic_s=12.5,
                            end_wall_s=1.7e9 + 2.5, exit_code=0, peak_memory_bytes=300 * 2**20)
    data = json.loads(record.to_json())
    assert data["duration_s"] == pytest.approx(2.5)
    assert data["outcome"] == "ok"
    assert ToolCallRecord.from_dict(data) == record
    assert ToolCallRecord(**{**record.__dict__, "signal": 9, "exit_code": None}).outcome == "signaled"
    assert ToolCallRecord(**{**record.__dict__, "oom_killed": True}).outcome == "oom_killed"
    assert ToolCallRecord(**{**record.__dict__, "end_monotonic_s": None}).outcome == "running"


def test_record_refuses_bad_input():
    with pytest.raises(InvalidInput, match="not valid JSON"):
        ToolCallRecord.from_json("{nope")
    with pytest.raises(InvalidInput, match="lacks call_id"):
        ToolCallRecord.from_dict({"sandbox": "s", "tool": "t", "command": "c",
                                  "start_monotonic_s": 0, "start_wall_s": 0})
    with pytest.raises(InvalidInput, match="version 9"):
        ToolCallRecord.from_dict({"version": 9})


def test_truncate_command():
    assert truncate_command(["echo", "hi"]) == "echo hi"
    long = truncate_command("x" * 1000)
    assert len(long) == 512 and long.endswith("...")


def test_exit_status_conversions():
    from agentcg.records import shell_exit_code, status_of

    assert status_of(0) == (0, None) and status_of(3) == (3, None) and status_of(-9) == (None, 9)
    assert shell_exit_code(3) == 3 and shell_exit_code(-15) == 143
