"""What the engine links count, summed over every link living and gone (the daemon's
/metrics read them: metrics.py and engine_metrics.py)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from agentcg.engine_protocol import KvTransfer, LlmRequest


@dataclass
class EngineCounters:
    """Counters summed over every link, living and gone (metrics are monotonic)."""

    events: dict[tuple[str, str], int] = field(default_factory=dict)        # (kind, source)
    decisions: dict[str, int] = field(default_factory=dict)                 # trigger
    directives: dict[str, int] = field(default_factory=dict)                # action sent
    results: dict[tuple[str, str], int] = field(default_factory=dict)       # (action, ok|refused)
    policy_failures: dict[str, int] = field(default_factory=dict)           # policy label
    fallbacks: dict[str, int] = field(default_factory=dict)                 # policy label
    protocol_errors: int = 0
    unknown_usage: int = 0
    links_attached: int = 0
    # v2 (real engines): per sandbox ("" = none given) and per move
    preemptions: dict[str, int] = field(default_factory=dict)              # sandbox
    llm_requests: dict[str, int] = field(default_factory=dict)             # sandbox
    llm_tokens: dict[tuple[str, str], int] = field(default_factory=dict)   # (sandbox, prompt|cached|loaded|output)
    moves: dict[tuple[str, str, str, str], int] = field(default_factory=dict)        # (op, src, dst, ok|failed)
    moved_bytes: dict[tuple[str, str, str], int] = field(default_factory=dict)       # (op, src, dst), ok only
    move_seconds: dict[tuple[str, str, str], float] = field(default_factory=dict)    # (op, src, dst), ok only
    unknown_sandbox: int = 0            # requests naming a sandbox the daemon does not have

    @staticmethod
    def bump(table: dict, key: Any, n: int = 1) -> None:
        table[key] = table.get(key, 0) + n

    def count_transfer(self, m: KvTransfer) -> None:
        """A KV move the engine measured: by op, source, destination and result; bytes and
        seconds of the ones that landed."""
        key = (m.op, m.src.value, m.dst.value)
        self.bump(self.moves, key + ("ok" if m.ok else "failed",))
        if m.ok:
            self.bump(self.moved_bytes, key, m.bytes)
            self.move_seconds[key] = self.move_seconds.get(key, 0.0) + m.seconds

    def count_llm_request(self, sandbox: str, m: LlmRequest) -> None:
        """A finished LLM call of `sandbox` ("" = none given) and its tokens."""
        self.bump(self.llm_requests, sandbox)
        for part, n in (("prompt", m.prompt_tokens), ("cached", m.cached_tokens), ("loaded", m.loaded_tokens),
                        ("output", m.output_tokens)):
            self.bump(self.llm_tokens, (sandbox, part), n)
