"""Sandbox policies: pure decisions over a snapshot of sandboxes and their tool calls.

    from agentcg.policies.sandbox import make_policy, Snapshot, SandboxView, CallView
    policy = make_policy("agentcg")            # or "static", "none"
    state = policy.initial_state()
    actions, state = policy.decide(snapshot, state)

`controller/enforce.py` turns the actions into cgroup writes.
"""
from __future__ import annotations

from agentcg.errors import InvalidInput
from agentcg.policies.sandbox.graduated import GraduatedConfig, GraduatedPolicy, GraduatedState
from agentcg.policies.sandbox.hints import estimate_need, kill_message
from agentcg.policies.sandbox.simple import NonePolicy, StaticPolicy
from agentcg.policies.sandbox.types import (
    ACTION_KINDS, ADMIT, DEFER, FREEZE, KILL, LIMIT, PRIORITIES, PRIORITY_CPU_WEIGHT, PROTECT, RELAX, THAW, THROTTLE, Action,
    CallView, Event, PendingCall, SandboxPolicy, SandboxView, Snapshot, check_priority,
)

POLICY_NAMES = ("agentcg", "static", "none")

__all__ = [
    "make_policy", "POLICY_NAMES", "GraduatedConfig", "GraduatedPolicy", "GraduatedState", "StaticPolicy",
    "NonePolicy", "SandboxPolicy", "Snapshot", "SandboxView", "CallView", "PendingCall", "Event", "Action",
    "ACTION_KINDS", "THROTTLE", "FREEZE", "THAW", "RELAX", "KILL", "PROTECT", "LIMIT", "ADMIT", "DEFER",
    "PRIORITIES", "PRIORITY_CPU_WEIGHT", "check_priority", "estimate_need", "kill_message",
]


def make_policy(name: str, config: GraduatedConfig | None = None) -> SandboxPolicy:
    if name == "agentcg":
        return GraduatedPolicy(config)
    if name == "static":
        return StaticPolicy()
    if name == "none":
        return NonePolicy()
    raise InvalidInput(f"unknown policy {name!r}; choose one of {', '.join(POLICY_NAMES)}")
