"""Reading the files of one AgentCgroup session folder: JSON loading with per-file errors,
timestamps, podman-stats samples and tool calls. Every problem raises `BadTask` with a
message that names the file and the entry; the importer turns it into a per-task skip.
"""
from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from agentcg.errors import InvalidInput
from agentcg.records import ToolCallRecord, truncate_command

MAX_JSON_BYTES = 512 * 1024**2     # a published file is a few MB; anything this big is not one
TZ_ROUND_S = 900                   # time-zone offsets are whole quarter hours


class BadTask(Exception):
    """This session folder cannot be imported; the message says which file and why."""


def load_json(path: Path) -> Any:
    try:
        size = path.stat().st_size
        if size > MAX_JSON_BYTES:
            raise BadTask(f"{path.name}: {size} bytes, more than the {MAX_JSON_BYTES} a session file may hold")
        return json.loads(path.read_bytes())
    except OSError as exc:
        raise BadTask(f"{path.name}: unreadable ({exc.strerror})") from None
    except UnicodeDecodeError:
        raise BadTask(f"{path.name}: not UTF-8 text; is it an AgentCgroup file?") from None
    except ValueError as exc:
        raise BadTask(f"{path.name}: broken JSON ({exc}); the file is truncated or not JSON") from None


def utc(text: Any, what: str) -> float:
    """Epoch seconds of an ISO-8601 timestamp that names its zone (`...Z`)."""
    if not isinstance(text, str):
        raise BadTask(f"{what}: expected an ISO timestamp, got {text!r}")
    try:
        stamp = datetime.fromisoformat(text)
    except ValueError:
        raise BadTask(f"{what}: not an ISO timestamp: {text!r}") from None
    if stamp.tzinfo is None:
        raise BadTask(f"{what}: {text!r} has no time zone; expected UTC with Z")
    return stamp.timestamp()


def naive_as_utc(text: Any) -> float | None:
    try:
        return datetime.fromisoformat(text).replace(tzinfo=timezone.utc).timestamp()
    except (TypeError, ValueError):
        return None


def tz_offset(sample: Any) -> float | None:
    """Offset of the recording host's local time from UTC, from one sample's two clocks."""
    if not isinstance(sample, dict) or not is_number(sample.get("epoch")):
        return None
    naive = naive_as_utc(sample.get("timestamp"))
    if naive is None:
        return None
    return round((float(sample["epoch"]) - naive) / TZ_ROUND_S) * TZ_ROUND_S


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def parse_samples(raw: list[Any], where: str) -> tuple[Any, Any, Any, Any]:
    """(epoch s, memory bytes, limit bytes, cores) arrays; NaN where podman measured nothing."""
    import numpy as np

    from agentcg.units import parse_size

    n = len(raw)
    times, mem, limit, cpu = (np.full(n, np.nan) for _ in range(4))
    for i, sample in enumerate(raw):
        if not isinstance(sample, dict):
            raise BadTask(f"{where}: sample {i} is not an object")
        try:
            times[i] = float(sample["epoch"])
            used_text, _, limit_text = str(sample["mem_usage"]).partition("/")
            used = parse_size(used_text.strip(), what=f"{where} sample {i} mem_usage")
            cap = parse_size(limit_text.strip(), what=f"{where} sample {i} mem_usage limit")
            cores = float(str(sample["cpu_percent"]).strip().removesuffix("%")) / 100.0
        except KeyError as exc:
            raise BadTask(f"{where}: sample {i} lacks {exc}") from None
        except (InvalidInput, ValueError, TypeError) as exc:
            raise BadTask(str(exc) if isinstance(exc, InvalidInput) else f"{where}: sample {i}: {exc}") from None
        if cap == 0:          # "0B / 0B": podman had no container to measure
            continue
        mem[i], limit[i], cpu[i] = used, cap, cores
    if np.any(np.diff(times) < 0):
        raise BadTask(f"{where}: sample epochs go backwards")
    return times, mem, limit, cpu


def parse_call(task: str, index: int, call: Any, where: str,
               result_times: dict[str, float]) -> ToolCallRecord:
    """A tool call; a missing `end_timestamp` is the time of the trace.jsonl tool_result of
    the same tool_use_id (`result_times`), else unknown (None)."""
    what = f"{where} call {index}"
    if not isinstance(call, dict):
        raise BadTask(f"{what}: not an object")
    for key in ("id", "tool", "timestamp"):
        if not call.get(key):
            raise BadTask(f"{what}: lacks {key!r}")
    start = utc(call["timestamp"], what)
    end = utc(call["end_timestamp"], what) if call.get("end_timestamp") else result_times.get(str(call["id"]))
    if end is not None and end < start:
        raise BadTask(f"{what}: ends before it starts")
    tool_input = call.get("input") if isinstance(call.get("input"), dict) else {}
    command = tool_input.get("command") if call["tool"] == "Bash" else None
    command = command if isinstance(command, str) else json.dumps(tool_input, sort_keys=True)
    # no monotonic clock in the dataset: the wall clock stands in for it
    return ToolCallRecord(sandbox=task, call_id=str(call["id"]), tool=str(call["tool"]),
                          command=truncate_command(command), start_monotonic_s=start,
                          start_wall_s=start, end_monotonic_s=end, end_wall_s=end)


def seconds(meta: dict[str, Any], key: str, where: str) -> float:
    value = meta.get(key, 0.0)
    if value is None:
        return 0.0
    if not is_number(value) or value < 0:
        raise BadTask(f"{where}: {key} must be seconds, got {value!r}")
    return float(value)


def optional_size(value: Any, where: str) -> int | None:
    if value in (None, ""):
        return None
    from agentcg.units import parse_size

    try:
        return parse_size(value if isinstance(value, (int, str)) else str(value), what=f"{where} memory_limit")
    except InvalidInput as exc:
        raise BadTask(str(exc)) from None


def optional_cores(value: Any, where: str) -> float | None:
    """`cpu_limit` is a number or a numeric string ("2") in the published results.json."""
    if value in (None, ""):
        return None
    try:
        cores = float(value)
    except (TypeError, ValueError):
        raise BadTask(f"{where}: cpu_limit must be a number of cores, got {value!r}") from None
    return cores if cores > 0 else None
