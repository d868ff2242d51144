"""The baselines behind the same interface: `static` (a container limit per sandbox) and
`none` (no decisions; only the kernel acts)."""
from __future__ import annotations

from dataclasses import dataclass

from agentcg.policies.sandbox.types import ADMIT, LIMIT, Action, Snapshot
from agentcg.units import format_bytes


@dataclass(frozen=True)
class StaticState:
    limited: frozenset[str] = frozenset()


class StaticPolicy:
    """Each sandbox capped at budget / N with memory.max, set once, like `docker run -m`.
    Over its cap the kernel OOM-kills inside the sandbox; nothing else is done."""

    name = "static"

    def initial_state(self) -> StaticState:
        return StaticState()

    def decide(self, snapshot: Snapshot, state: StaticState) -> tuple[list[Action], StaticState]:
        actions = _admit_all(snapshot, "static: no admission control")
        budget, n = snapshot.host_budget_bytes, len(snapshot.sandboxes)
        if not budget or not n:
            return actions, state
        cap = budget // n
        limited = set(state.limited)
        for sb in snapshot.sandboxes:
            if sb.name not in limited:
                limited.add(sb.name)
                actions.append(Action(LIMIT, sb.name, None, cap,
                                      f"static: host budget {format_bytes(budget)} / {n} sandboxes = "
                                      f"memory.max {format_bytes(cap)}"))
        return actions, StaticState(frozenset(limited))


class NonePolicy:
    name = "none"

    def initial_state(self) -> None:
        return None

    def decide(self, snapshot: Snapshot, state: None) -> tuple[list[Action], None]:
        return _admit_all(snapshot, "none: no admission control"), state


def _admit_all(snapshot: Snapshot, reason: str) -> list[Action]:
    return [Action(ADMIT, sb.name, p.call_id, None, reason) for sb in snapshot.sandboxes for p in sb.pending]
