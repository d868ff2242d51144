"""The LLM record file: what an agent writes, one JSON object per line, for `agentcg
profile` to fill the trace's `llm_requests` table (docs/profiling.md, "LLM record file").

    {"time_s": 1770000000.25, "request_id": "r1", "model": "qwen3", "input_tokens": 13385,
     "output_tokens": 208, "duration_s": 3.1}
    {"usage": {"input_tokens": 8, "cache_creation_input_tokens": 252,
               "cache_read_input_tokens": 20773, "output_tokens": 85}}
    {"usage": {"prompt_tokens": 9000, "completion_tokens": 40,
               "prompt_tokens_details": {"cached_tokens": 8192}}}

Either the trace's own columns (`input_tokens` is the whole context) or `usage`, the
response's usage object as the API returned it: Anthropic style (input + cache creation
+ cache read is the context) or OpenAI style (prompt_tokens is the context,
prompt_tokens_details.cached_tokens the cache hits). `time_s` defaults to when the line
was read, `request_id` to `llm-<line>`. A bad line is counted and named, never fatal.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from agentcg.profiler.importers.agentcgroup_files import BadTask
from agentcg.profiler.importers.agentcgroup_llm import usage_columns

MAX_LINE_BYTES = 64 * 1024
MAX_ERRORS_KEPT = 20
USAGE_OPENAI = "openai"
_COLUMNS = {"time_s": float, "request_id": str, "model": str, "input_tokens": int, "output_tokens": int,
            "cache_read_tokens": int, "cache_creation_tokens": int, "duration_s": float, "is_sidechain": bool,
            "usage_format": str}


class BadRecord(ValueError):
    pass


@dataclass
class RecordErrors:
    count: int = 0
    first: list[str] = field(default_factory=list)

    def add(self, text: str) -> None:
        self.count += 1
        if len(self.first) < MAX_ERRORS_KEPT:
            self.first.append(text)


def _openai(usage: dict[str, Any]) -> dict[str, Any]:
    details = usage.get("prompt_tokens_details") if isinstance(usage.get("prompt_tokens_details"), dict) else {}
    return {"input_tokens": usage.get("prompt_tokens"), "output_tokens": usage.get("completion_tokens"),
            "cache_read_tokens": details.get("cached_tokens"), "cache_creation_tokens": None,
            "usage_format": USAGE_OPENAI}


def parse_record(line: bytes | str, number: int, read_at_s: float) -> dict[str, Any]:
    """One line -> an llm_requests row (without session_id). BadRecord says what is wrong."""
    if len(line) > MAX_LINE_BYTES:
        raise BadRecord(f"line {number}: longer than {MAX_LINE_BYTES} bytes")
    try:
        entry = json.loads(line)
    except ValueError as exc:
        raise BadRecord(f"line {number}: not JSON ({exc})") from None
    if not isinstance(entry, dict):
        raise BadRecord(f"line {number}: not a JSON object")
    row: dict[str, Any] = {}
    usage = entry.get("usage")
    if isinstance(usage, dict):
        try:
            row.update(_openai(usage) if "prompt_tokens" in usage else usage_columns(usage, f"line {number}"))
        except BadTask as exc:
            raise BadRecord(str(exc)) from None
    elif usage is not None:
        raise BadRecord(f"line {number}: 'usage' must be an object")
    for key, kind in _COLUMNS.items():
        value = entry.get(key)
        if value is None:
            continue
        ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
        if kind is float:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not ok or (kind in (int, float) and value < 0):
            raise BadRecord(f"line {number}: {key} must be a non-negative {kind.__name__}, got {value!r}")
        row[key] = value
    if row.get("input_tokens") is None:
        raise BadRecord(f"line {number}: needs input_tokens (the context) or a usage object")
    row.setdefault("usage_format", "plain")
    row.setdefault("time_s", read_at_s)
    row.setdefault("request_id", f"llm-{number}")
    return row
