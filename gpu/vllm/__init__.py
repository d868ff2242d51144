"""agentcg's vLLM V1 KV connector (docs/vllm.md).

`connector.py` is the only module of agentcg that imports vLLM; `sessions.py` (scheduler
side), `datapath.py` (worker side) and `link.py` (the daemon link) do not, so they are
tested without vLLM. Importing this package imports nothing of vLLM.
"""
