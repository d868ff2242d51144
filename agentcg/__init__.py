"""agentcg: a kernel-level resource controller and profiler for AI-agent sandboxes.

Parts live in one namespace: `agentcg.controller`, `agentcg.bpf`, `agentcg.gpu`,
`agentcg.policies`, `agentcg.profiler`. Small types that cross parts (errors, units,
records) live here, in `agentcg.errors`, `agentcg.units` and `agentcg.records`.
Nothing is imported at package import time, so `agentcg --help` stays fast.
"""

__version__ = "0.1.0"
