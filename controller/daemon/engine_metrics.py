"""The engine links' figures on the daemon's /metrics (metrics.py yields these).

Links and what they decided: links attached, requests by state, KV bytes by tier, request
events by source, policy decisions, directives and their results, policy failures and
fallbacks, protocol errors. From real engines (vLLM, protocol v2), per sandbox: LLM calls
and their tokens (prompt, cached by the engine's prefix cache, loaded back by agentcg,
output), preemptions, KV bytes by tier; per engine: what it last reported of itself
(vLLM's /metrics: KV cache use, preemptions, prefix-cache counters, blocks agentcg keeps);
per move: bytes and seconds.
"""
from __future__ import annotations

from typing import Any, Iterator

from prometheus_client.core import GaugeMetricFamily

from agentcg.controller.daemon.engine_link import TIERS
from agentcg.controller.daemon.families import counter, counters, gauge, gauges

# EngineStats attribute -> (family, help): what each engine last reported of itself
ENGINE_STATS = (
    ("kv_usage_frac", "agentcg_engine_kv_cache_usage_ratio", "The engine's GPU KV cache in use (0..1)."),
    ("held_blocks", "agentcg_engine_kept_blocks", "GPU KV blocks agentcg keeps for paused sessions."),
    ("gpu_blocks", "agentcg_engine_gpu_blocks", "GPU KV blocks the engine has."),
    ("preemptions_total", "agentcg_engine_reported_preemptions", "Preemptions the engine counted itself."),
    ("prefix_cache_queries", "agentcg_engine_prefix_cache_queries", "Prefix-cache queries (tokens), as the engine "
     "counts them."),
    ("prefix_cache_hits", "agentcg_engine_prefix_cache_hits", "Prefix-cache hits (tokens), as the engine counts them."),
)


def engine_families(hub: Any) -> Iterator[Any]:
    c = hub.counters
    yield gauge("agentcg_engine_links", "Inference engines attached now.", len(hub.links))
    yield counter("agentcg_engine_links_attached", "Engine links ever attached.", c.links_attached)
    states = {"running": 0, "waiting": 0, "paused": 0}
    tiers = dict.fromkeys(TIERS, 0)
    by_sandbox: dict[tuple[str, str], int] = {}
    for link in hub.links.values():
        bpt = link.registration.geometry.bytes_per_token if link.registration else 0
        for r in link.requests.values():
            states[r.state.value] = states.get(r.state.value, 0) + 1
        for sandbox, tokens in link.tokens_by_sandbox().items():
            for tier, n in tokens.items():
                tiers[tier] += n * bpt
                by_sandbox[(sandbox, tier)] = by_sandbox.get((sandbox, tier), 0) + n * bpt
    yield gauges("agentcg_engine_requests", "Engine requests known now, by state.", ["state"], states)
    yield gauges("agentcg_engine_kv_bytes", "KV bytes the engines reported, by tier.", ["tier"], tiers)
    yield counters("agentcg_engine_events", "Request events, by kind and source (engine: reported; daemon: inferred "
                   "from tool calls).", ["kind", "source"], c.events)
    yield counters("agentcg_engine_policy_decisions", "KV policy decisions, by trigger.", ["trigger"], c.decisions)
    yield counters("agentcg_engine_directives", "Directives sent to engines, by action.", ["action"], c.directives)
    yield counters("agentcg_engine_directive_results", "Directive results the engines reported, by action and "
                   "result (ok, refused).", ["action", "result"], c.results)
    yield counters("agentcg_engine_policy_failures", "KV policy calls that raised, by policy.", ["policy"],
                   c.policy_failures)
    yield counters("agentcg_engine_policy_fallbacks", "Decisions made by vllm-v1 because the KV policy failed, by "
                   "policy.", ["policy"], c.fallbacks)
    yield counter("agentcg_engine_protocol_errors", "Malformed engine lines (each closed its link).", c.protocol_errors)
    yield counter("agentcg_engine_unknown_usage", "KV usage reports for requests the daemon does not know (ignored).",
                  c.unknown_usage)
    # version 2 (real engines)
    yield counters("agentcg_engine_llm_requests", "LLM calls the engines reported finished, by sandbox (\"\" = none "
                   "given).", ["sandbox"], c.llm_requests)
    yield counters("agentcg_engine_llm_tokens", "Tokens of those calls, by sandbox and kind (prompt, cached: the "
                   "engine's prefix cache, loaded: by agentcg, output).", ["sandbox", "kind"], c.llm_tokens)
    yield counters("agentcg_engine_preemptions", "Preemptions the engines reported, by sandbox.", ["sandbox"],
                   c.preemptions)
    yield counters("agentcg_engine_kv_moves", "KV moves the engines measured, by op, source, destination and result.",
                   ["op", "src", "dst", "result"], c.moves)
    yield counters("agentcg_engine_kv_moved_bytes", "Bytes of the KV moves that landed.", ["op", "src", "dst"],
                   c.moved_bytes)
    yield counters("agentcg_engine_kv_move_seconds", "Seconds the KV moves that landed took.", ["op", "src", "dst"],
                   c.move_seconds)
    yield counter("agentcg_engine_unknown_sandboxes", "Sandbox names engines gave that the daemon did not have when "
                  "it first saw them.", c.unknown_sandbox)
    yield gauges("agentcg_engine_sandbox_kv_bytes", "KV bytes of each sandbox's requests, by tier.", ["sandbox", "tier"],
                 by_sandbox)
    for attr, name, doc in ENGINE_STATS:
        family = GaugeMetricFamily(name, doc, labels=["engine"])
        for link in hub.links.values():
            value = getattr(link.stats, attr, None) if link.stats is not None else None
            if value is not None and link.registration is not None:
                family.add_metric([link.registration.engine_id], value)
        yield family
