"""Tool-call duration prediction per tool and sandbox, updated live.

Learned from finished tool calls (the controller's tool-call records, or the engine's
pause/resume gaps): a bounded window of durations per (sandbox, tool) and per tool, and a
global one. The remaining time of a call in progress follows its elapsed time (a call
that outlived its median is expected to last until the p90, then as long again as it has
run: long tool calls are heavy-tailed), and live signals from the controller: a
throttled call runs slower, a frozen one does not return until thawed, an exited one has
returned (its KV should come back now).
"""
from __future__ import annotations

import enum
import math
from collections import deque
from dataclasses import dataclass, field

from agentcg.policies.bounded import recent

WINDOW = 64
MIN_SAMPLES = 3
DEFAULT_S = 1.0
THROTTLE_SLOWDOWN = 2.0


class ToolSignal(str, enum.Enum):
    STARTED = "started"
    THROTTLED = "throttled"
    FROZEN = "frozen"
    THAWED = "thawed"
    EXITED = "exited"


@dataclass(frozen=True)
class ToolPrediction:
    median_s: float
    p90_s: float
    samples: int
    source: str            # "sandbox", "tool", "global" or "default"


def tool_key(tool: str | None, command: str | None = None) -> str:
    """The tool a duration is learned for: "Bash:<first word>" for shell commands."""
    name = tool or "unknown"
    if command and name.lower() in ("bash", "shell", "sh"):
        words = command.split()
        if words:
            return f"{name}:{words[0].rsplit('/', 1)[-1]}"
    return name


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


@dataclass
class ToolDurationPredictor:
    window: int = WINDOW
    min_samples: int = MIN_SAMPLES
    default_s: float = DEFAULT_S
    by_sandbox: dict[tuple[str, str], deque] = field(default_factory=dict)
    by_tool: dict[str, deque] = field(default_factory=dict)
    overall: deque = field(default_factory=lambda: deque(maxlen=WINDOW))
    _cache: dict = field(default_factory=dict, repr=False)    # (sandbox, tool) -> prediction until a record

    def record(self, sandbox: str, tool: str, duration_s: float) -> None:
        if not math.isfinite(duration_s) or duration_s < 0:
            return
        self._cache.clear()
        window = self.window
        recent(self.by_sandbox, (sandbox, tool), lambda: deque(maxlen=window)).append(duration_s)
        recent(self.by_tool, tool, lambda: deque(maxlen=window)).append(duration_s)
        self.overall.append(duration_s)

    def predict(self, sandbox: str, tool: str) -> ToolPrediction:
        key = (sandbox, tool)
        cached = self._cache.get(key)
        if cached is None:
            cached = self._cache[key] = self._predict(sandbox, tool)
        return cached

    def _predict(self, sandbox: str, tool: str) -> ToolPrediction:
        for source, samples in (("sandbox", self.by_sandbox.get((sandbox, tool))),
                                ("tool", self.by_tool.get(tool)), ("global", self.overall)):
            if samples is not None and len(samples) >= self.min_samples:
                values = list(samples)
                return ToolPrediction(_quantile(values, 0.5), _quantile(values, 0.9), len(values), source)
        return ToolPrediction(self.default_s, self.default_s * 4, 0, "default")


def remaining_s(prediction: ToolPrediction, elapsed_s: float, signal: ToolSignal | None = None) -> float:
    if signal is ToolSignal.EXITED:
        return 0.0
    if signal is ToolSignal.FROZEN:
        return math.inf
    if elapsed_s < prediction.median_s:
        left = prediction.median_s - elapsed_s
    elif elapsed_s < prediction.p90_s:
        left = prediction.p90_s - elapsed_s
    else:
        left = max(elapsed_s, prediction.median_s)
    return left * THROTTLE_SLOWDOWN if signal is ToolSignal.THROTTLED else left
