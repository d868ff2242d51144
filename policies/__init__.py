"""agentcg.policies: pure decisions. Observed state in, actions out; no I/O here."""
