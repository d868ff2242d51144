"""Small AgentCgroup session folders written by the tests in the published format (the
field names and shapes of ../shared/datasets/agentcgroup-published-sample), with token
figures chosen so that the expected counts and sums are known by hand."""
from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

T0 = 1_772_695_000.0          # 2026-03-05 07:16:40 UTC


def iso(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def local(t: float, offset_s: float = -8 * 3600) -> str:
    return datetime.fromtimestamp(t + offset_s, timezone.utc).replace(tzinfo=None).isoformat()


def samples(start: float, n: int, mb: list[float] | None = None) -> list[dict[str, Any]]:
    mb = mb or [100.0 + 10 * i for i in range(n)]
    return [{"timestamp": local(start + i), "epoch": start + i, "mem_usage": f"{mb[i]}MB / 4.295GB",
             "mem_percent": "1.00%", "cpu_percent": "50.00%"} for i in range(n)]


def anthropic_usage(raw: int, creation: int, read: int, out: int) -> dict[str, Any]:
    return {"input_tokens": raw, "cache_creation_input_tokens": creation, "cache_read_input_tokens": read,
            "cache_creation": {"ephemeral_5m_input_tokens": 0, "ephemeral_1h_input_tokens": creation},
            "output_tokens": out, "service_tier": "standard"}


class Session:
    """One session: tool calls (start, duration), LLM turns (time, usage) -> the files."""

    def __init__(self, start: float = T0) -> None:
        self.start = start
        self.calls: list[dict[str, Any]] = []
        self.lines: list[dict[str, Any]] = []
        self.turns = 0

    def turn(self, t: float, usage: dict[str, Any], *, blocks: int = 2, tool: str | None = None,
             model: str = "claude-haiku-4-5-20251001", sidechain: bool = False) -> str:
        """An assistant response written as `blocks` lines sharing one message id (as the
        agent logs it: one line per content block; the last has the final output_tokens)."""
        self.turns += 1
        msg_id = f"msg_{self.turns:04d}"
        for b in range(blocks):
            content = [{"type": "text", "text": "ok"}]
            if tool and b == blocks - 1:
                call_id = f"toolu_{self.turns:04d}"
                content = [{"type": "tool_use", "id": call_id, "name": tool, "input": {"command": f"echo {b}"}}]
            line_usage = dict(usage, output_tokens=usage["output_tokens"] if b == blocks - 1 else 1)
            self.lines.append({"parentUuid": None, "isSidechain": sidechain, "type": "assistant",
                               "sessionId": "s-1", "timestamp": iso(t + 0.01 * b),
                               "message": {"model": model, "id": msg_id, "type": "message", "role": "assistant",
                                           "content": content, "usage": line_usage}})
        return msg_id

    def call(self, call_id: str, tool: str, start: float, duration: float, *, end_in_calls: bool = True) -> None:
        entry = {"timestamp": iso(start), "tool": tool, "id": call_id, "input": {"command": f"run {call_id}"},
                 "result_preview": "done"}
        if end_in_calls:
            entry["end_timestamp"] = iso(start + duration)
        self.calls.append(entry)
        self.lines.append({"type": "user", "sessionId": "s-1", "timestamp": iso(start + duration),
                           "message": {"role": "user", "content": [
                               {"tool_use_id": call_id, "type": "tool_result", "content": "done"}]}})

    def results(self) -> dict[str, Any]:
        return {"image": "swerebench/x", "start_time": local(self.start - 2), "memory_limit": "4g", "cpu_limit": "2",
                "model": "haiku", "pull_time": 1.5, "permission_fix_time": 0.5, "total_time": 40.0,
                "end_time": local(self.start + 36), "claude_output": {"stdout": "DONE", "exit_code": 0},
                "resource_samples": {"samples": samples(self.start, 30)},
                "traces": {"tool_calls": self.calls}}

    def write_published(self, folder: Path, *, results: bool = True, resources: bool = True,
                        tool_calls: bool = True) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        if results:
            (folder / "results.json").write_text(json.dumps(self.results(), indent=1))
        if tool_calls:
            (folder / "tool_calls.json").write_text(json.dumps(self.calls, indent=2))
        if resources:
            (folder / "resources.json").write_text(json.dumps({"samples": samples(self.start, 30)}, indent=2))
        (folder / "trace.jsonl").write_text("".join(json.dumps(line) + "\n" for line in self.lines))
        return folder

    def write_reshaped(self, folder: Path) -> Path:
        """Our reshaped copy: meta.json and llm_calls.json instead of results.json and trace.jsonl."""
        folder.mkdir(parents=True, exist_ok=True)
        meta = {k: v for k, v in self.results().items() if not isinstance(v, (dict, list))}
        (folder / "meta.json").write_text(json.dumps(meta))
        (folder / "tool_calls.json").write_text(json.dumps(self.calls))
        (folder / "resources.json").write_text(json.dumps({"samples": samples(self.start, 30)}))
        llm: dict[str, dict[str, Any]] = {}
        for line in self.lines:
            m = line.get("message", {})
            if line["type"] == "assistant":      # first line's time, the response's final output count
                entry = llm.setdefault(m["id"], {
                    "timestamp": line["timestamp"], "id": m["id"], "model": m["model"],
                    "is_sidechain": line["isSidechain"], "input_tokens": m["usage"]["input_tokens"]})
                entry["output_tokens"] = m["usage"]["output_tokens"]
        (folder / "llm_calls.json").write_text(json.dumps(list(llm.values())))
        return folder


def anthropic_session(start: float = T0, *, end_in_calls: bool = False) -> Session:
    """3 turns, Anthropic usage: contexts 20,783 + 21,033 + 22,000 = 63,816 tokens, of which
    input_tokens alone 10 + 8 + 12 = 30, cache reads 19,110 + 20,773 + 21,000 = 60,883;
    2 tool calls (Bash 1 s, Read 2 s), by default without end_timestamp."""
    s = Session(start)
    s.turn(start + 1, anthropic_usage(10, 1663, 19110, 199), tool="Bash")
    s.call("toolu_0001", "Bash", start + 2, 1.0, end_in_calls=end_in_calls)
    s.turn(start + 4, anthropic_usage(8, 252, 20773, 85), blocks=3, tool="Read")
    s.call("toolu_0002", "Read", start + 5, 2.0, end_in_calls=end_in_calls)
    s.turn(start + 8, anthropic_usage(12, 988, 21000, 40), blocks=1)
    return s


def local_session(start: float = T0) -> Session:
    """2 turns of a llama.cpp model (input_tokens is the context): 13,385 + 13,914 = 27,299;
    3 tool calls with end_timestamp."""
    s = Session(start)
    s.turn(start + 1, {"input_tokens": 13385, "output_tokens": 208}, blocks=3, tool="Read",
           model="unsloth/GLM-4.7-Flash-GGUF:Q4_K_M")
    s.call("toolu_0001", "Read", start + 2, 0.5)
    s.call("toolu_x", "Grep", start + 3, 0.5)
    s.turn(start + 5, {"input_tokens": 13914, "output_tokens": 129}, tool="Bash",
           model="unsloth/GLM-4.7-Flash-GGUF:Q4_K_M")
    s.call("toolu_0002", "Bash", start + 6, 3.0)
    return s
