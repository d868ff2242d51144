"""LLM requests and tool timings of one AgentCgroup session: from `llm_calls.json` (our
reshaped copy) or the agent's raw session log `trace.jsonl`.

trace.jsonl holds one JSON object per line. An LLM request is an `"type": "assistant"`
line with `message.usage`; the agent writes one line per content block of a response, so
several lines share one `message.id`: the first line's time is the request's, the
largest `output_tokens` its output. A `"type": "user"` line with `tool_result` content
blocks gives each tool's result time (by `tool_use_id`); `tool_use` blocks of assistant
lines give each tool call's start, name and input.

Token semantics, per usage record (see docs/profiling.md):
- Anthropic style (the record has `cache_creation_input_tokens` or
  `cache_read_input_tokens`): `input_tokens` is only the uncached remainder, so the
  context is input + cache_creation + cache_read; usage_format "anthropic".
- otherwise (llama.cpp serving the Anthropic API locally, our llm_calls.json):
  `input_tokens` is the whole context; usage_format "plain", cache columns null.
- model "<synthetic>": a message Claude Code made itself (an error or interruption
  notice, zero tokens); kept as a row (the published counts include them) with
  usage_format "synthetic" and left out of the plausibility check.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agentcg.profiler.importers.agentcgroup_files import BadTask, is_number, utc

USAGE_ANTHROPIC = "anthropic"
USAGE_PLAIN = "plain"
USAGE_SYNTHETIC = "synthetic"   # Claude Code's own placeholder message (model "<synthetic>"): no request ran
SYNTHETIC_MODEL = "<synthetic>"
CACHE_KEYS = ("cache_creation_input_tokens", "cache_read_input_tokens")
MAX_LINE_BYTES = 64 * 1024**2
# a turn's context below this share of the previous turn's (same conversation) is flagged:
# a context only shrinks on compaction; a 10x drop is more often a misread usage format
IMPLAUSIBLE_DROP = 0.1


@dataclass
class SessionLog:
    """What trace.jsonl says of a session (all times epoch seconds)."""

    requests: list[dict[str, Any]] = field(default_factory=list)   # llm_requests rows
    result_times: dict[str, float] = field(default_factory=dict)   # tool_use_id -> result time
    tool_uses: list[dict[str, Any]] = field(default_factory=list)  # tool_calls.json-shaped entries
    lines: int = 0
    session_lines: int = 0          # lines shaped like the agent's log (type user/assistant, sessionId)
    duplicate_lines: int = 0        # assistant lines of a message id already counted
    skipped: list[str] = field(default_factory=list)


def _token(value: Any, what: str, key: str) -> int | None:
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise BadTask(f"{what}: {key} must be a non-negative integer, got {value!r}")
    return value


def usage_columns(usage: dict[str, Any], what: str, model: Any = None) -> dict[str, Any]:
    """llm_requests columns (input/output/cache tokens, usage_format) of one usage record."""
    raw_in = _token(usage.get("input_tokens"), what, "input_tokens")
    out = _token(usage.get("output_tokens"), what, "output_tokens")
    if model == SYNTHETIC_MODEL:     # kept (the published counts include it), never compared
        return {"input_tokens": raw_in, "output_tokens": out, "cache_read_tokens": None,
                "cache_creation_tokens": None, "usage_format": USAGE_SYNTHETIC}
    if any(key in usage for key in CACHE_KEYS):
        creation = _token(usage.get("cache_creation_input_tokens"), what, "cache_creation_input_tokens") or 0
        read = _token(usage.get("cache_read_input_tokens"), what, "cache_read_input_tokens") or 0
        context = None if raw_in is None else raw_in + creation + read
        return {"input_tokens": context, "output_tokens": out, "cache_read_tokens": read,
                "cache_creation_tokens": creation, "usage_format": USAGE_ANTHROPIC}
    return {"input_tokens": raw_in, "output_tokens": out, "cache_read_tokens": None,
            "cache_creation_tokens": None, "usage_format": USAGE_PLAIN}


def parse_llm_calls(task: str, entries: Any) -> list[dict[str, Any]]:
    """Rows of llm_calls.json (one entry per request, already deduplicated)."""
    if not isinstance(entries, list):
        raise BadTask("llm_calls.json: expected a JSON list of requests")
    rows = []
    for index, entry in enumerate(entries):
        what = f"llm_calls.json entry {index}"
        if not isinstance(entry, dict):
            raise BadTask(f"{what}: not an object")
        rows.append({"session_id": task, "request_id": str(entry.get("id") or f"{task}-{index}"),
                     "time_s": utc(entry.get("timestamp"), what), "model": entry.get("model"),
                     "is_sidechain": bool(entry.get("is_sidechain", False)), **usage_columns(entry, what, entry.get("model"))})
    return rows


def read_session_log(task: str, path: Path) -> SessionLog:
    """Parse trace.jsonl; a line that is not a JSON object is a BadTask (truncated or foreign)."""
    log = SessionLog()
    by_id: dict[str, dict[str, Any]] = {}
    try:
        with open(path, "rb") as fh:
            for number, raw in enumerate(fh, start=1):
                if len(raw) > MAX_LINE_BYTES:
                    raise BadTask(f"trace.jsonl line {number}: longer than {MAX_LINE_BYTES} bytes")
                if not raw.strip():
                    continue
                try:
                    entry = json.loads(raw)
                except ValueError as exc:
                    raise BadTask(f"trace.jsonl line {number}: broken JSON ({exc}); "
                                  "the file is truncated or not an agent session log") from None
                if not isinstance(entry, dict):
                    raise BadTask(f"trace.jsonl line {number}: not a JSON object; not an agent session log")
                log.lines += 1
                _take(task, entry, number, log, by_id)
    except OSError as exc:
        raise BadTask(f"trace.jsonl: unreadable ({exc.strerror})") from None
    if log.lines and not log.session_lines:
        raise BadTask("trace.jsonl: no line has a 'type' of user/assistant or a 'sessionId'; "
                      "not an agent session log")
    log.requests = list(by_id.values())
    return log


def _take(task: str, entry: dict[str, Any], number: int, log: SessionLog,
          by_id: dict[str, dict[str, Any]]) -> None:
    kind = entry.get("type")
    message = entry.get("message")
    log.session_lines += kind in ("assistant", "user") or "sessionId" in entry
    if kind not in ("assistant", "user") or not isinstance(message, dict):
        return
    what = f"trace.jsonl line {number}"
    content = message.get("content") if isinstance(message.get("content"), list) else []
    if kind == "user":
        for block in content:
            if isinstance(block, dict) and block.get("type") == "tool_result" and block.get("tool_use_id"):
                log.result_times.setdefault(str(block["tool_use_id"]), utc(entry.get("timestamp"), what))
        return
    for block in content:
        if isinstance(block, dict) and block.get("type") == "tool_use" and block.get("id"):
            log.tool_uses.append({"id": block["id"], "tool": block.get("name"), "input": block.get("input"),
                                  "timestamp": entry.get("timestamp")})
    usage = message.get("usage")
    if not isinstance(usage, dict):
        return
    if not is_number(usage.get("input_tokens")):
        log.skipped.append(f"{what}: usage without input_tokens")
        return
    request_id = str(message.get("id") or f"{task}-line{number}")
    columns = usage_columns(usage, what, message.get("model"))
    known = by_id.get(request_id)
    if known is not None:           # another content block of the same response
        log.duplicate_lines += 1
        if (columns["output_tokens"] or 0) > (known["output_tokens"] or 0):
            known["output_tokens"] = columns["output_tokens"]
        return
    by_id[request_id] = {"session_id": task, "request_id": request_id, "time_s": utc(entry.get("timestamp"), what),
                         "model": message.get("model"), "is_sidechain": bool(entry.get("isSidechain", False)),
                         **columns}


def implausible_turns(rows: list[dict[str, Any]]) -> list[str]:
    """Requests whose context is far below the previous request's in the same conversation
    (main agent or sub-agents, told apart by is_sidechain), in time order."""
    flags = []
    last: dict[bool, int] = {}
    for row in sorted(rows, key=lambda r: r["time_s"]):
        context, side = row.get("input_tokens"), bool(row.get("is_sidechain"))
        if context is None or row.get("usage_format") == USAGE_SYNTHETIC:
            continue
        previous = last.get(side)
        if previous and context < IMPLAUSIBLE_DROP * previous:
            flags.append(f"LLM request {row['request_id']}: context {context:,} tokens, below "
                         f"{IMPLAUSIBLE_DROP:.0%} of the previous turn's {previous:,} "
                         f"(usage {row.get('usage_format')}); check the usage format")
        last[side] = context
    return flags
