"""A decoder-only transformer with seeded random weights, batch-invariant by construction.

Llama's layout (RMSNorm, GQA attention with RoPE, SwiGLU MLP), weights drawn from a seeded
generator as serving systems do for benchmarks ("dummy weights"). Greedy decoding must give
the same tokens whether a request's KV was kept, restored from host or SSD, or recomputed,
so every value a token computes must not depend on what else is in the batch or how its
context was chunked. Float rounding depends on reduction order, so:

- linear layers run as `bmm` over fixed tiles of `ROW_TILE` rows (padded), so every row
  goes through a GEMM of the same shape (a single GEMM's blocking changes with M, measured:
  M=1 and M=300 differ in the last bit);
- attention is computed per query, reducing over head_dim per element, over each KV block
  of `tokens_per_block` positions with the reduced axis innermost, and across blocks by a
  sequential `cumsum` (trailing masked blocks add exact zeros);
- exp, rsqrt and sigmoid run on padded contiguous slices so that every element takes the
  vectorised path (ATen's scalar tail loop can round differently);
- attention reads K and V back from the paged store (in the store's dtype) even for the
  tokens of the current chunk, so a recomputed token sees the same bits a restored one does.

Compute is float32 on CPU (bf16 GEMMs on CPU are slow and no more stable); the KV is kept
in the geometry's dtype. `tests/gpu/test_engine_model.py` checks the invariance bit for bit.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import torch

from agentcg.errors import InvalidInput
from agentcg.gpu.kvgeometry import KVGeometry

ROW_TILE = 8
QUERY_TILE = 8
POINTWISE_PAD = 64          # >= 2 x the widest float vector (AVX-512: 16 lanes)
POINTWISE_SLICE = 16384     # under ATen's grain size: one thread per slice, no split tails


@dataclass(frozen=True)
class ModelConfig:
    vocab: int = 512
    layers: int = 2
    q_heads: int = 8
    kv_heads: int = 2
    head_dim: int = 32
    mlp_dim: int = 448
    rope_theta: float = 500000.0
    max_positions: int = 16384
    seed: int = 0
    compute_dtype: torch.dtype = torch.float32

    def __post_init__(self) -> None:
        for name in ("vocab", "layers", "q_heads", "kv_heads", "head_dim", "mlp_dim", "max_positions"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise InvalidInput(f"model: {name} must be a positive integer, got {value!r}")
        if self.q_heads % self.kv_heads:
            raise InvalidInput(f"model: q_heads ({self.q_heads}) must be a multiple of kv_heads ({self.kv_heads})")
        if self.head_dim % 2:
            raise InvalidInput(f"model: head_dim must be even for RoPE, got {self.head_dim}")

    @property
    def d_model(self) -> int:
        return self.q_heads * self.head_dim

    @classmethod
    def for_geometry(cls, geometry: KVGeometry, *, vocab: int = 512, q_per_kv: int = 4, mlp_ratio: float = 3.5,
                     seed: int = 0, compute_dtype: torch.dtype = torch.float32) -> "ModelConfig":
        """A model whose KV has exactly `geometry`'s shape (Llama-3's 4 query heads per KV head
        and 3.5x MLP by default)."""
        q_heads = geometry.kv_heads * q_per_kv
        mlp = max(8, int(round(q_heads * geometry.head_dim * mlp_ratio / 8)) * 8)
        return cls(vocab=vocab, layers=geometry.layers, q_heads=q_heads, kv_heads=geometry.kv_heads,
                   head_dim=geometry.head_dim, mlp_dim=mlp, seed=seed, compute_dtype=compute_dtype)

    def check_geometry(self, geometry: KVGeometry) -> None:
        if (geometry.layers, geometry.kv_heads, geometry.head_dim) != (self.layers, self.kv_heads, self.head_dim):
            raise InvalidInput(
                f"model and KV geometry disagree: model has {self.layers} layers, {self.kv_heads} KV heads of "
                f"{self.head_dim}, the geometry {geometry.layers}, {geometry.kv_heads}, {geometry.head_dim}; "
                "build the model with ModelConfig.for_geometry(geometry)")


# Llama-3-8B's shape (random weights): for `--real` on a GPU.
LLAMA3_8B = ModelConfig(vocab=128256, layers=32, q_heads=32, kv_heads=8, head_dim=128, mlp_dim=14336,
                        compute_dtype=torch.bfloat16)


class KVAccess(Protocol):
    """One request's paged KV, as attention sees it (agentcg.gpu.engine.paged.RequestKV)."""

    def write(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> None: ...

    def gather(self, layer: int, n_tokens: int) -> tuple[torch.Tensor, torch.Tensor]: ...


@dataclass(frozen=True)
class Feed:
    """Tokens of one request to run this step, at positions start..start+len-1."""

    kv: KVAccess
    tokens: torch.Tensor     # int64 (n,)
    start: int


def pointwise(fn, x: torch.Tensor) -> torch.Tensor:
    """fn(x) with every element on ATen's vectorised path (CPU); plain fn(x) elsewhere."""
    if x.device.type != "cpu":
        return fn(x)
    flat = x.reshape(-1)
    n = flat.numel()
    pad = (-n) % POINTWISE_PAD
    if pad:
        flat = torch.cat((flat, flat.new_zeros(pad)))
    out = torch.cat([fn(flat[i:i + POINTWISE_SLICE]) for i in range(0, flat.numel(), POINTWISE_SLICE)])
    return out[:n].view(x.shape)


def linear(x: torch.Tensor, weight_t: torch.Tensor) -> torch.Tensor:
    """x (rows, in) @ weight_t (in, out), each row through a GEMM of one fixed shape."""
    rows = x.shape[0]
    pad = (-rows) % ROW_TILE
    if pad:
        x = torch.cat((x, x.new_zeros(pad, x.shape[1])))
    tiles = x.shape[0] // ROW_TILE
    out = torch.bmm(x.view(tiles, ROW_TILE, x.shape[1]), weight_t.unsqueeze(0).expand(tiles, -1, -1))
    return out.reshape(-1, weight_t.shape[1])[:rows]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    mean_sq = (x * x).sum(-1, keepdim=True) / x.shape[-1]
    return x * pointwise(torch.rsqrt, mean_sq + eps) * weight


class RandomDecoder:
    """The model: `step(feeds)` runs each feed's tokens (writing their KV) and returns, per
    feed, the greedy next token after its last position."""

    def __init__(self, config: ModelConfig, device: torch.device | str = "cpu") -> None:
        self.config = c = config
        self.device = torch.device(device)
        dt = c.compute_dtype
        gen = torch.Generator(device=self.device).manual_seed(c.seed)

        def weight(fan_in: int, *shape: int) -> torch.Tensor:
            w = torch.randn(*shape, generator=gen, device=self.device, dtype=torch.float32)
            return (w / math.sqrt(fan_in)).to(dt)

        d, hd = c.d_model, c.head_dim
        qkv_out = (c.q_heads + 2 * c.kv_heads) * hd
        self.embed = weight(1, c.vocab, d)
        self.layers = [{
            "attn_norm": torch.ones(d, dtype=dt, device=self.device),
            "wqkv": weight(d, d, qkv_out),
            "wo": weight(c.q_heads * hd, c.q_heads * hd, d),
            "mlp_norm": torch.ones(d, dtype=dt, device=self.device),
            "wgu": weight(d, d, 2 * c.mlp_dim),
            "wd": weight(c.mlp_dim, c.mlp_dim, d),
        } for _ in range(c.layers)]
        self.final_norm = torch.ones(d, dtype=dt, device=self.device)
        self.lm_head = weight(d, d, c.vocab)
        inv = 1.0 / (c.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
        angles = torch.outer(torch.arange(c.max_positions, dtype=torch.float64), inv)
        self.cos = angles.cos().to(dt).to(self.device)
        self.sin = angles.sin().to(dt).to(self.device)
        self.scale = 1.0 / math.sqrt(hd)

    @property
    def parameter_bytes(self) -> int:
        tensors = [self.embed, self.lm_head, *(t for layer in self.layers for t in layer.values())]
        return sum(t.numel() * t.element_size() for t in tensors)

    def _rope(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        # x (rows, heads, head_dim), rotate-half convention
        cos = self.cos[positions][:, None, :]
        sin = self.sin[positions][:, None, :]
        half = x.shape[-1] // 2
        a, b = x[..., :half], x[..., half:]
        return torch.cat((a * cos - b * sin, a * sin + b * cos), dim=-1)

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int) -> torch.Tensor:
        """q (n, q_heads, hd) at positions start.., k/v (blocks, T, kv_heads, hd) -> (n, q_heads*hd)."""
        c = self.config
        n, hd, h, g = q.shape[0], c.head_dim, c.kv_heads, c.q_heads // c.kv_heads
        nb, t = k.shape[0], k.shape[1]
        kp = k.permute(2, 0, 1, 3)                       # (h, nb, T, hd)
        vp = v.permute(2, 0, 3, 1).contiguous()           # (h, nb, hd, T)
        key_pos = torch.arange(nb * t, device=q.device).view(nb, t)
        qg = (q * self.scale).view(n, h, g, hd)
        out = []
        for lo in range(0, n, QUERY_TILE):
            qt = qg[lo:lo + QUERY_TILE]
            m = qt.shape[0]
            scores = (qt[:, :, :, None, None, :] * kp[None, :, None]).sum(-1)      # (m, h, g, nb, T)
            q_pos = torch.arange(start + lo, start + lo + m, device=q.device)
            visible = (key_pos[None] <= q_pos[:, None, None])[:, None, None]       # (m, 1, 1, nb, T)
            scores = scores.masked_fill(~visible, float("-inf"))
            peak = scores.amax(dim=(-2, -1), keepdim=True)
            e = pointwise(torch.exp, scores - peak)
            den = e.sum(-1).cumsum(-1)[..., -1]                                      # (m, h, g)
            num = (e[:, :, :, :, None, :] * vp[None, :, None]).sum(-1)              # (m, h, g, nb, hd)
            num = num.cumsum(-2)[..., -1, :]
            out.append((num / den[..., None]).reshape(m, h * g * hd))
        return torch.cat(out)

    @torch.inference_mode()
    def step(self, feeds: list[Feed]) -> list[int]:
        c = self.config
        if not feeds:
            return []
        dt = c.compute_dtype
        tokens = torch.cat([f.tokens for f in feeds]).to(self.device)
        if int(tokens.max()) >= c.vocab or int(tokens.min()) < 0:
            raise InvalidInput(f"model: token ids must be in 0..{c.vocab - 1}")
        spans, positions, row = [], [], 0
        for f in feeds:
            n = f.tokens.numel()
            if f.start + n > c.max_positions:
                raise InvalidInput(f"model: context of {f.start + n} tokens exceeds max_positions {c.max_positions}")
            spans.append((row, row + n))
            positions.append(torch.arange(f.start, f.start + n, device=self.device))
            row += n
        pos = torch.cat(positions)
        x = self.embed[tokens]
        hd, hq, hk = c.head_dim, c.q_heads, c.kv_heads
        for li, w in enumerate(self.layers):
            qkv = linear(rms_norm(x, w["attn_norm"]), w["wqkv"])
            q = self._rope(qkv[:, :hq * hd].view(-1, hq, hd), pos)
            k = self._rope(qkv[:, hq * hd:(hq + hk) * hd].view(-1, hk, hd), pos)
            v = qkv[:, (hq + hk) * hd:].reshape(-1, hk, hd)
            attn = []
            for f, (a, b) in zip(feeds, spans):
                f.kv.write(li, f.start, k[a:b], v[a:b])
                kk, vv = f.kv.gather(li, f.start + (b - a))
                attn.append(self._attend(q[a:b], kk.to(dt), vv.to(dt), f.start))
            x = x + linear(torch.cat(attn), w["wo"])
            gu = linear(rms_norm(x, w["mlp_norm"]), w["wgu"])
            gate, up = gu[:, :c.mlp_dim], gu[:, c.mlp_dim:]
            x = x + linear(gate * pointwise(torch.sigmoid, gate) * up, w["wd"])
        last = torch.tensor([b - 1 for _, b in spans], device=self.device)
        logits = linear(rms_norm(x[last], self.final_norm), self.lm_head)
        return [int(i) for i in logits.float().argmax(-1).tolist()]
