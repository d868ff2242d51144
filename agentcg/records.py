"""Records that cross parts: written by the controller, read by the profiler, the
daemon and the policies. Plain dataclasses in base units, serialised as JSON lines.

Field names carry their unit (`_bytes`, `_s`); `None` means "not measured" (for
example no eBPF on the host), never zero.
"""
from __future__ import annotations

import copy
import functools
import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any

from agentcg.errors import InvalidInput

RECORD_VERSION = 1
COMMAND_MAX_CHARS = 512


def status_of(returncode: int) -> tuple[int | None, int | None]:
    """Popen.returncode -> (exit_code, signal): a negative code is a death by that signal."""
    return (None, -returncode) if returncode < 0 else (returncode, None)


def shell_exit_code(returncode: int) -> int:
    """Popen.returncode -> what a shell reports: 128+N for a death by signal N."""
    return returncode if returncode >= 0 else 128 - returncode


@functools.lru_cache(maxsize=1)
def _field_names() -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(ToolCallRecord))


def truncate_command(argv: list[str] | str, limit: int = COMMAND_MAX_CHARS) -> str:
    text = argv if isinstance(argv, str) else " ".join(argv)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def append_record(path: str | os.PathLike, record: "ToolCallRecord") -> None:
    """Append `record` as one JSON line to `path` (created 0644 with its directory).
    One write(2) on O_APPEND, so concurrent writers' lines do not interleave."""
    os.makedirs(os.path.dirname(os.fspath(path)) or ".", exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        os.write(fd, (record.to_json() + "\n").encode())
    finally:
        os.close(fd)


@dataclass
class ToolCallRecord:
    """One tool call: a command run in its own cgroup, and what it cost."""

    sandbox: str
    call_id: str
    tool: str
    command: str
    start_monotonic_s: float
    start_wall_s: float
    end_monotonic_s: float | None = None
    end_wall_s: float | None = None
    exit_code: int | None = None          # set when the call exited
    signal: int | None = None             # set when it was killed by a signal
    oom_killed: bool = False
    priority: str = "normal"
    mem_hint_bytes: int | None = None
    peak_memory_bytes: int | None = None  # from the cgroup (memory.peak / max_usage)
    peak_rss_bytes: int | None = None     # from eBPF kmem:rss_stat
    cpu_s: float | None = None
    runq_latency_p50_s: float | None = None
    runq_latency_p99_s: float | None = None
    page_faults: int | None = None
    reclaim_stall_s: float | None = None
    block_read_bytes: int | None = None
    block_write_bytes: int | None = None
    processes: int | None = None          # processes seen forked in the call
    policy_action: str | None = None      # last action a policy took on the call
    message: str | None = None            # what the agent is told (why it was killed)
    version: int = RECORD_VERSION
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def duration_s(self) -> float | None:
        if self.end_monotonic_s is None:
            return None
        return self.end_monotonic_s - self.start_monotonic_s

    @property
    def outcome(self) -> str:
        if self.end_monotonic_s is None:
            return "running"
        if self.oom_killed:
            return "oom_killed"
        if self.policy_action == "kill":
            return "policy_killed"
        if self.signal is not None:
            return "signaled"
        return "ok" if self.exit_code == 0 else "failed"

    def to_dict(self) -> dict[str, Any]:
        # a shallow copy, `extra` copied one level (its values are numbers, strings, bools):
        # dataclasses.asdict deep-copies recursively, ~0.3 ms a record in the daemon
        values = self.__dict__
        data = {name: values[name] for name in _field_names()}
        data["extra"] = copy.deepcopy(self.extra) if any(isinstance(v, (dict, list)) for v in self.extra.values()) \
            else dict(self.extra)
        data["duration_s"] = self.duration_s
        data["outcome"] = self.outcome
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ToolCallRecord":
        if not isinstance(data, dict):
            raise InvalidInput(f"tool-call record: expected a JSON object, got {type(data).__name__}")
        version = data.get("version", RECORD_VERSION)
        if version != RECORD_VERSION:
            raise InvalidInput(
                f"tool-call record version {version} is not supported (this agentcg reads {RECORD_VERSION})"
            )
        names = {f.name for f in dataclasses.fields(cls)}
        missing = [n for n in ("sandbox", "call_id", "tool", "command", "start_monotonic_s", "start_wall_s")
                   if n not in data]
        if missing:
            raise InvalidInput(f"tool-call record lacks {', '.join(missing)}")
        return cls(**{k: v for k, v in data.items() if k in names})

    @classmethod
    def from_json(cls, line: str) -> "ToolCallRecord":
        try:
            data = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InvalidInput(f"tool-call record is not valid JSON: {exc}") from None
        return cls.from_dict(data)
