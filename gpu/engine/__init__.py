"""The reference inference engine (`agentcg.gpu.engine`, docs/engine.md).

A decoder-only transformer with seeded random weights, a paged KV cache in the tiered KV
store, continuous batching, preemption, and the engine protocol's events and directives,
with decisions from a KV policy of `agentcg.policies.kv`.

    from agentcg.gpu.engine.run import run_sessions, InProcessDriver, RunResult
    from agentcg.gpu.engine.turns import EngineSession, EngineTurn
    from agentcg.gpu.engine.engine import Engine, EngineLimits
    from agentcg.gpu.engine.model import ModelConfig, RandomDecoder, LLAMA3_8B
"""
