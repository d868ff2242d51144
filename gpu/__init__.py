"""agentcg.gpu: NVML sampling, the tiered KV-cache store and the reference engine."""
