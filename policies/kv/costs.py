"""Times the policies weigh, from the engine's registered cost model (pure arithmetic)."""
from __future__ import annotations

import math

from agentcg.engine_protocol import ComputeCost


def prefill_time_s(cost: ComputeCost, tokens: int, start_tokens: int = 0) -> float:
    """Time to prefill `tokens` new tokens after `start_tokens` already in the KV, alone on
    the GPU in chunks of `max_batched_tokens`: fixed cost per chunk, GEMMs per token, and
    attention over every earlier position."""
    if tokens <= 0:
        return 0.0
    chunks = math.ceil(tokens / cost.max_batched_tokens)
    positions = tokens * start_tokens + tokens * tokens / 2
    return chunks * cost.step_fixed_s + tokens * cost.token_s + positions * cost.prefill_attn_s_per_token_pos


def transfer_time_s(nbytes: int, bytes_per_s: float) -> float:
    if nbytes <= 0:
        return 0.0
    if bytes_per_s <= 0:
        return math.inf
    return nbytes / bytes_per_s
