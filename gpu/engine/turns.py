"""Agent sessions as the reference engine runs them, and what it reports per turn.

The field names match `agentcg.profiler.kvsim_sessions.SimSession`/`SimTurn`, so the
simulator's sessions can be passed as they are (the engine reads only these fields).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence


class TurnSpec(Protocol):
    input_tokens: int        # the LLM call's whole context
    output_tokens: int
    tool: str | None         # the tool call after this turn
    tool_s: float            # its duration (the trace's gap); 0 after the last turn


class SessionSpec(Protocol):
    session_id: str
    sandbox: str
    turns: Sequence[TurnSpec]


@dataclass(frozen=True)
class EngineTurn:
    input_tokens: int
    output_tokens: int
    tool: str | None = None
    tool_s: float = 0.0


@dataclass(frozen=True)
class EngineSession:
    session_id: str
    sandbox: str
    turns: tuple[EngineTurn, ...]


@dataclass(frozen=True)
class TurnResult:
    turn: int
    prompt_tokens: int           # context fed to this LLM call (the session's tokens so far)
    output_tokens: int
    arrival_s: float             # engine clock (seconds since the engine started)
    admitted_s: float
    first_token_s: float
    end_s: float
    cached_tokens: int           # KV found on the device (or brought back) at admission
    recomputed_tokens: int       # tokens whose KV had been computed before and was fed again
    output: tuple[int, ...]      # the greedy tokens

    @property
    def ttft_s(self) -> float:
        return self.first_token_s - self.arrival_s


def turn_input_tokens(turn: TurnSpec, context_tokens: int, cap: int | None) -> int:
    """New tokens appended for a turn: its context beyond what the session already has
    (at least 1: the tool's result), capped at `cap`."""
    n = max(1, int(turn.input_tokens) - context_tokens)
    return n if cap is None else max(1, min(n, cap))
