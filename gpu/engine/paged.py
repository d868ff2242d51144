"""Paged KV on the tiered store: where attention reads and writes a request's blocks.

A request's KV lives in `TieredKVStore` blocks of `tokens_per_block` tokens, shape
(2, layers, T, kv_heads, head_dim). Attention needs the blocks' slots in the device pool:
`store.block(rid, i)` is a view into `store.device.pool`, so its slot is its offset there
divided by the block size. Slots are cached per request and dropped whenever the engine
moves the request (swap, offload, load, discard), since a move changes them.
"""
from __future__ import annotations

import torch

from agentcg.gpu.kvstore import TieredKVStore


def blocks_for(tokens: int, tokens_per_block: int) -> int:
    return -(-tokens // tokens_per_block)


class PagedKV:
    def __init__(self, store: TieredKVStore) -> None:
        self.store = store
        g = store.geometry
        self.geometry = g
        self.tokens_per_block = g.tokens_per_block
        self._slots: dict[str, list[int]] = {}

    def _pool(self) -> torch.Tensor:
        pool = self.store.device.pool
        g = self.geometry
        return pool.view(g.dtype).view(pool.shape[0], *g.block_shape)

    def slots(self, request_id: str) -> list[int]:
        """Device-pool slot of each block (every block must be on the device)."""
        cached = self._slots.get(request_id)
        n = self.store.placement(request_id)
        total = n.device_blocks + n.host_blocks + n.ssd_blocks
        if cached is None or len(cached) != total:
            base = self.store.device.pool.data_ptr()
            bb = self.store.block_bytes
            cached = [(self.store.block(request_id, i).data_ptr() - base) // bb for i in range(total)]
            self._slots[request_id] = cached
        return cached

    def forget(self, request_id: str) -> None:
        self._slots.pop(request_id, None)

    def view(self, request_id: str) -> "RequestKV":
        return RequestKV(self, request_id)


class RequestKV:
    """KVAccess for one request (agentcg.gpu.engine.model.KVAccess)."""

    def __init__(self, paged: PagedKV, request_id: str) -> None:
        self.paged = paged
        self.request_id = request_id
        self._index: torch.Tensor | None = None

    def _slot_index(self) -> torch.Tensor:
        if self._index is None:
            device = self.paged.store.device.pool.device
            self._index = torch.tensor(self.paged.slots(self.request_id), dtype=torch.long, device=device)
        return self._index

    def write(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        t = self.paged.tokens_per_block
        pool = self.paged._pool()
        positions = torch.arange(start, start + k.shape[0], device=pool.device)
        slots = self._slot_index()[positions // t]
        offsets = positions % t
        pool[slots, 0, layer, offsets] = k.to(pool.dtype)
        pool[slots, 1, layer, offsets] = v.to(pool.dtype)

    def gather(self, layer: int, n_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        nb = blocks_for(n_tokens, self.paged.tokens_per_block)
        pool = self.paged._pool()
        slots = self._slot_index()[:nb]
        return pool[slots, 0, layer], pool[slots, 1, layer]
