"""Reference engine on this host: decode tokens/s and the cost of each KV path for one resumed request.

    .venv/bin/python bench/bench_engine.py [--layers 4] [--context 512] [--repeats 3] [--threads N]

1. Decode: batches of 1 and 8 requests at a fixed context, tokens/s of the engine's
   batch-invariant kernels beside a baseline in the same run: the same weights and KV with
   plain matmuls and torch's scaled_dot_product_attention (not batch-invariant).
2. KV paths: one session of two turns (a `--context`-token prompt, a tool call of 0.2 s,
   then 16 new tokens and one output token). Time to first token of the second turn when
   its KV was kept on the device, swapped to the host, offloaded to SSD, or discarded and
   recomputed; keep is the baseline (ratio = path / keep). Medians of `--repeats`.
Geometry: Llama-3-8B's KV heads (8 x 128, bf16) with `--layers` layers; the model has one
query head per KV head and a 1x MLP so that weights fit a small host.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from agentcg.engine_protocol import Action, Directive
from agentcg.gpu.engine import model as model_mod
from agentcg.gpu.engine.model import Feed, ModelConfig, RandomDecoder
from agentcg.gpu.engine.paged import PagedKV, blocks_for
from agentcg.gpu.engine.run import run_sessions
from agentcg.gpu.engine.turns import EngineSession, EngineTurn
from agentcg.gpu.kvgeometry import KVGeometry
from agentcg.gpu.kvstore import TieredKVStore
from agentcg.policies.kv import make_policy
from agentcg.policies.kv.types import NO_DECISION, Decision, Trigger
from agentcg.units import format_bytes

REPO = Path(__file__).resolve().parents[1]


class OnPause:
    name = "on-pause"
    shares_host_memory = False

    def __init__(self, action: Action) -> None:
        self.action = action
        self.base = make_policy("vllm-v1")

    def decide(self, snap):
        if snap.trigger is Trigger.PAUSE:
            return Decision((Directive(snap.subject, self.action),))
        return self.base.decide(snap) if snap.trigger is Trigger.PRESSURE else NO_DECISION

    def observe(self, event) -> None:
        return None

    def waiting_key(self, view):
        return self.base.waiting_key(view)


def plain_attend(self, q, k, v, start):
    c = self.config
    kk = k.reshape(-1, c.kv_heads, c.head_dim)[: start + q.shape[0]].transpose(0, 1)
    vv = v.reshape(-1, c.kv_heads, c.head_dim)[: start + q.shape[0]].transpose(0, 1)
    g = c.q_heads // c.kv_heads
    kk, vv = kk.repeat_interleave(g, 0), vv.repeat_interleave(g, 0)
    n = q.shape[0]
    mask = torch.arange(start + n)[None] <= torch.arange(start, start + n)[:, None]
    out = torch.nn.functional.scaled_dot_product_attention(q.transpose(0, 1), kk, vv, attn_mask=mask)
    return out.transpose(0, 1).reshape(n, -1)


def decode_rate(model: RandomDecoder, store: TieredKVStore, batch: int, context: int, steps: int) -> float:
    paged = PagedKV(store)
    ids = [f"r{i}" for i in range(batch)]
    n_blocks = blocks_for(context + steps + 1, store.geometry.tokens_per_block)
    for rid in ids:
        store.allocate(rid, n_blocks)
    model.step([Feed(paged.view(ids[0]), torch.zeros(context, dtype=torch.long), 0)])
    for rid in ids[1:]:                     # the same context: copy the first request's KV
        for i in range(n_blocks):
            store.block(rid, i).copy_(store.block(ids[0], i))
    start = time.perf_counter()
    for s in range(steps):
        model.step([Feed(paged.view(rid), torch.zeros(1, dtype=torch.long), context + s) for rid in ids])
    elapsed = time.perf_counter() - start
    for rid in ids:
        store.discard(rid)
    return batch * steps / elapsed


def bench_decode(geometry: KVGeometry, config: ModelConfig, context: int, steps: int) -> None:
    model = RandomDecoder(config)
    print(f"decode, context {context} tokens, {steps} steps (tokens/s)")
    print(f"{'batch':>6} {'engine':>10} {'plain torch':>12} {'ratio':>6}")
    with TieredKVStore(geometry, 8 * blocks_for(context + steps + 1, geometry.tokens_per_block), 0,
                       device="cpu") as store:
        for batch in (1, 8):
            ours = decode_rate(model, store, batch, context, steps)
            saved = (model_mod.linear, model_mod.pointwise, RandomDecoder._attend)
            model_mod.linear = lambda x, w: x @ w
            model_mod.pointwise = lambda fn, x: fn(x)
            RandomDecoder._attend = plain_attend
            try:
                plain = decode_rate(model, store, batch, context, steps)
            finally:
                model_mod.linear, model_mod.pointwise, RandomDecoder._attend = saved
            print(f"{batch:>6} {ours:>10.1f} {plain:>12.1f} {ours / plain:>6.2f}")


def bench_paths(geometry: KVGeometry, config: ModelConfig, context: int, repeats: int, ssd_dir: Path) -> None:
    session = [EngineSession("s", "sb", (EngineTurn(context, 1, "Bash:pytest", 0.2), EngineTurn(context + 17, 1)))]
    blocks = 2 * blocks_for(context + 32, geometry.tokens_per_block)
    print(f"\nresumed request, {context}-token context + 16 new tokens (time to first token, median of {repeats})")
    print(f"{'path':>10} {'ttft':>10} {'ratio':>6} {'moved':>12}  transfer time (sum of legs)")
    keep_ttft = None
    outputs = None
    for name, action in (("keep", Action.KEEP), ("swap", Action.SWAP_TO_HOST), ("offload", Action.OFFLOAD_TO_SSD),
                         ("recompute", Action.DISCARD)):
        ttfts, moved, move_s = [], 0, 0.0
        for _ in range(repeats):
            r = run_sessions(session, geometry, OnPause(action), device_blocks=blocks, host_blocks=blocks,
                             ssd_dir=ssd_dir, ssd_blocks=blocks, model=config, device="cpu", timeout_s=600)
            ttfts.append(r.sessions[0].turns[1].ttft_s)
            moved = sum(t.bytes for t in r.traffic)
            move_s = sum(t.seconds for t in r.traffic)
            if outputs is None:
                outputs = r.outputs()
            assert r.outputs() == outputs, "outputs differ between KV paths"
        ttft = statistics.median(ttfts)
        keep_ttft = keep_ttft or ttft
        print(f"{name:>10} {ttft * 1e3:>8.1f} ms {ttft / keep_ttft:>6.2f} {format_bytes(moved):>12}  {move_s * 1e3:.1f} ms")
    print("outputs identical across the four paths: yes")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--decode-steps", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    geometry = KVGeometry(args.layers, 8, 128, "bf16", 16)
    config = ModelConfig.for_geometry(geometry, q_per_kv=1, mlp_ratio=1.0)
    print(f"KV geometry: {args.layers} layers x 8 KV heads x 128, bf16, {format_bytes(geometry.bytes_per_token)}/token; "
          f"model d={config.d_model}, mlp={config.mlp_dim}, vocab={config.vocab}, float32 compute on CPU, "
          f"{torch.get_num_threads()} torch threads")
    bench_decode(geometry, config, args.context, args.decode_steps)
    with tempfile.TemporaryDirectory(prefix="agentcg-bench-engine-", dir=REPO) as d:
        bench_paths(geometry, config, args.context, args.repeats, Path(d))
    return 0


if __name__ == "__main__":
    sys.exit(main())
