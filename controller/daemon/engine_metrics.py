"""The engine links' version-2 figures on the daemon's /metrics (real engines: vLLM).

Per sandbox: LLM calls and their tokens (prompt, cached by the engine's prefix cache,
loaded back by agentcg, output), preemptions, KV bytes by tier; per engine: what it last
reported of itself (vLLM's /metrics: KV cache use, preemptions, prefix-cache counters,
blocks agentcg keeps); per move: bytes and seconds. metrics.py yields these after its own
engine families.
"""
from __future__ import annotations

from typing import Any, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily


def engine_families(hub: Any) -> Iterator[Any]:
    c = hub.counters
    calls = CounterMetricFamily("agentcg_engine_llm_requests", "LLM calls the engines reported finished, by "
                                "sandbox (\"\" = none given).", labels=["sandbox"])
    for sandbox, n in sorted(c.llm_requests.items()):
        calls.add_metric([sandbox], n)
    yield calls
    tokens = CounterMetricFamily("agentcg_engine_llm_tokens", "Tokens of those calls, by sandbox and kind "
                                 "(prompt, cached: the engine's prefix cache, loaded: by agentcg, output).",
                                 labels=["sandbox", "kind"])
    for (sandbox, kind), n in sorted(c.llm_tokens.items()):
        tokens.add_metric([sandbox, kind], n)
    yield tokens
    preempt = CounterMetricFamily("agentcg_engine_preemptions", "Preemptions the engines reported, by sandbox.",
                                  labels=["sandbox"])
    for sandbox, n in sorted(c.preemptions.items()):
        preempt.add_metric([sandbox], n)
    yield preempt
    moves = CounterMetricFamily("agentcg_engine_kv_moves", "KV moves the engines measured, by op, source, "
                                "destination and result.", labels=["op", "src", "dst", "result"])
    for key, n in sorted(c.moves.items()):
        moves.add_metric(list(key), n)
    yield moves
    moved = CounterMetricFamily("agentcg_engine_kv_moved_bytes", "Bytes of the KV moves that landed.",
                                labels=["op", "src", "dst"])
    for key, n in sorted(c.moved_bytes.items()):
        moved.add_metric(list(key), n)
    yield moved
    seconds = CounterMetricFamily("agentcg_engine_kv_move_seconds", "Seconds the KV moves that landed took.",
                                  labels=["op", "src", "dst"])
    for key, t in sorted(c.move_seconds.items()):
        seconds.add_metric(list(key), t)
    yield seconds
    unknown = CounterMetricFamily("agentcg_engine_unknown_sandboxes", "Sandbox names engines gave that the "
                                  "daemon did not have when it first saw them.")
    unknown.add_metric([], c.unknown_sandbox)
    yield unknown
    by_sandbox = GaugeMetricFamily("agentcg_engine_sandbox_kv_bytes", "KV bytes of each sandbox's requests, "
                                   "by tier.", labels=["sandbox", "tier"])
    totals: dict[tuple[str, str], int] = {}
    for link in hub.links.values():
        bpt = link.registration.geometry.bytes_per_token if link.registration else 0
        for sandbox, tiers in link.tokens_by_sandbox().items():
            for tier, n in tiers.items():
                totals[(sandbox, tier)] = totals.get((sandbox, tier), 0) + n * bpt
    for key, n in sorted(totals.items()):
        by_sandbox.add_metric(list(key), n)
    yield by_sandbox
    fields = (("kv_usage_frac", "agentcg_engine_kv_cache_usage_ratio", "The engine's GPU KV cache in use (0..1)."),
              ("held_blocks", "agentcg_engine_kept_blocks", "GPU KV blocks agentcg keeps for paused sessions."),
              ("gpu_blocks", "agentcg_engine_gpu_blocks", "GPU KV blocks the engine has."),
              ("preemptions_total", "agentcg_engine_reported_preemptions", "Preemptions the engine counted itself."),
              ("prefix_cache_queries", "agentcg_engine_prefix_cache_queries", "Prefix-cache queries (tokens), as "
               "the engine counts them."),
              ("prefix_cache_hits", "agentcg_engine_prefix_cache_hits", "Prefix-cache hits (tokens), as the engine "
               "counts them."))
    for attr, name, doc in fields:
        family = GaugeMetricFamily(name, doc, labels=["engine"])
        for link in hub.links.values():
            value = getattr(link.stats, attr, None) if link.stats is not None else None
            if value is not None and link.registration is not None:
                family.add_metric([link.registration.engine_id], value)
        yield family
