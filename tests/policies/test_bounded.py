"""Policy state stays bounded on a long-running host: the least recently updated keys go."""
from __future__ import annotations

from agentcg.policies import bounded
from agentcg.policies.bounded import recent, touch
from agentcg.policies.kv.predictor import ToolDurationPredictor


def test_touch_keeps_the_most_recent_keys():
    m: dict[str, int] = {}
    for i, key in enumerate("abcd"):
        touch(m, key, i, cap=3)
    assert list(m) == ["b", "c", "d"]
    touch(m, "b", 9, cap=3)                  # updated: now the most recent
    touch(m, "e", 5, cap=3)
    assert list(m) == ["d", "b", "e"] and m["b"] == 9


def test_recent_creates_once_and_refreshes():
    m: dict[str, list] = {}
    recent(m, "x", list, cap=2).append(1)
    recent(m, "y", list, cap=2).append(2)
    recent(m, "x", list, cap=2).append(3)    # same list, moved to the end
    recent(m, "z", list, cap=2)
    assert m == {"x": [1, 3], "z": []}


def test_the_duration_predictor_forgets_the_oldest_tools(monkeypatch):
    monkeypatch.setattr(bounded, "MAX_KEYS", 3)
    p = ToolDurationPredictor()
    for i in range(10):
        p.record("sb", f"tool{i}", 1.0)
    assert sorted(p.by_tool) == ["tool7", "tool8", "tool9"]
    assert len(p.by_sandbox) == 3
