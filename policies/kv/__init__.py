"""KV-cache policies: pure decisions over a snapshot of an engine's KV (docs/kv-policies.md).

    make_policy("vllm-v1" | "infercept" | "continuum" | "continuum-paper" | "agentcg")
"""
from __future__ import annotations

from typing import Any

POLICY_NAMES = ("vllm-v1", "infercept", "continuum", "continuum-paper", "agentcg")
DEFAULT_POLICIES = ("vllm-v1", "infercept", "continuum", "agentcg")


def make_policy(name: str, **params: Any):
    """A fresh policy (its own state) by name; `params` go to its constructor."""
    from agentcg.errors import InvalidInput

    if name == "vllm-v1":
        from agentcg.policies.kv.vllm_v1 import VllmV1Policy
        return VllmV1Policy(**params)
    if name == "infercept":
        from agentcg.policies.kv.infercept import InferceptPolicy
        return InferceptPolicy(**params)
    if name in ("continuum", "continuum-paper"):
        from agentcg.policies.kv.continuum import ContinuumPolicy
        return ContinuumPolicy(rule="released" if name == "continuum" else "paper", **params)
    if name == "agentcg":
        from agentcg.policies.kv.agentcg import AgentcgPolicy
        return AgentcgPolicy(**params)
    raise InvalidInput(f"unknown KV policy {name!r}; choose from {', '.join(POLICY_NAMES)}")
