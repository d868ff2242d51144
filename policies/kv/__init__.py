"""KV-cache policies: pure decisions over a snapshot of an engine's KV (docs/kv-policies.md).

    make_policy("vllm-v1" | "vllm-v1-priority" | "vllm-v1-offload" | "infercept" |
                "continuum" | "continuum-paper" | "agentcg")

`vllm-v1-offload`, `continuum` and `continuum-paper` run with vLLM's native CPU offloading
(policies/kv/offload.py); `infercept` swaps into its own swap space; all three are given the
same fixed host pool by their user. `agentcg` shares host memory with the sandboxes.
"""
from __future__ import annotations

from typing import Any

POLICY_NAMES = ("vllm-v1", "vllm-v1-priority", "vllm-v1-offload", "infercept", "continuum", "continuum-paper",
                "agentcg")
DEFAULT_POLICIES = ("vllm-v1", "vllm-v1-offload", "infercept", "continuum", "agentcg")


def make_policy(name: str, **params: Any):
    """A fresh policy (its own state) by name; `params` go to its constructor."""
    from agentcg.errors import InvalidInput

    if name in ("vllm-v1", "vllm-v1-priority"):
        from agentcg.policies.kv.vllm_v1 import VllmV1Policy
        return VllmV1Policy(mode="priority" if name == "vllm-v1-priority" else "fcfs", **params)
    if name == "vllm-v1-offload":
        from agentcg.policies.kv.offload import NativeOffloadPolicy
        from agentcg.policies.kv.vllm_v1 import VllmV1Policy
        return NativeOffloadPolicy(VllmV1Policy(**params), name)
    if name == "infercept":
        from agentcg.policies.kv.infercept import InferceptPolicy
        return InferceptPolicy(**params)
    if name in ("continuum", "continuum-paper"):
        from agentcg.policies.kv.continuum import ContinuumPolicy
        from agentcg.policies.kv.offload import NativeOffloadPolicy
        rule = "released" if name == "continuum" else "paper"
        return NativeOffloadPolicy(ContinuumPolicy(rule=rule, offload=True, **params), name)
    if name == "agentcg":
        from agentcg.policies.kv.agentcg import AgentcgPolicy
        return AgentcgPolicy(**params)
    raise InvalidInput(f"unknown KV policy {name!r}; choose from {', '.join(POLICY_NAMES)}")
