"""The connector's worker-side data path: blocks between vLLM's paged KV cache and agentcg's
tiered KV store (agentcg.gpu.kvstore). No vLLM import: it sees vLLM's cache as a dict of
per-layer tensors, as `register_kv_caches` hands them over.

A vLLM layer cache has one dimension of `num_blocks` entries (the CPU backend:
[num_blocks, kv_heads, block_size, 2 * head_size]; the CUDA FlashAttention backend:
[2, num_blocks, block_size, kv_heads, head_size]). One store block holds one vLLM block of
every layer: the store block's bytes, viewed as (layers, per-layer elements), are filled
layer by layer with the vLLM block's elements in the cache's own order. The store never
interprets them, so save and load only have to agree with each other; the layout is the
same on CPU and CUDA (on CUDA the store's device tier is on the GPU, and swap-out and load
are its pinned-host and SSD moves).

Every move goes through the store, so it yields TransferRecords (bytes, seconds); the
copies between vLLM's cache and the store's device tier are measured here as "gather"
(save) and "scatter" (load) legs.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from typing import Sequence

import torch

from agentcg.gpu.kvgeometry import KVGeometry, KVTierFull, TransferRecord
from agentcg.gpu.kvstore import TieredKVStore

log = logging.getLogger("agentcg.vllm.datapath")

HOST, SSD = "host", "ssd"


class LayoutError(ValueError):
    """vLLM's KV cache tensors do not have a layout this data path can copy."""


@dataclass(frozen=True)
class SaveJob:
    """Copy `block_ids` (vLLM's, in token order) of session `key` to tier `dst`."""

    job_id: int
    key: str
    block_ids: tuple[int, ...]
    dst: str                     # host or ssd


@dataclass(frozen=True)
class MoveJob:
    """A store-only move of session `key`'s copy: "offload" (host -> ssd) or "discard"."""

    job_id: int
    key: str
    op: str


@dataclass(frozen=True)
class LoadJob:
    """Copy store blocks [first, first + len(block_ids)) of `key` into vLLM `block_ids`."""

    job_id: int
    key: str
    first: int
    block_ids: tuple[int, ...]
    drop_after: bool = True      # discard the store copy once it is back in vLLM's cache


@dataclass
class JobResult:
    job_id: int
    key: str
    op: str
    ok: bool
    blocks: int = 0
    reason: str | None = None
    legs: list[tuple[str, str, int, float]] = field(default_factory=list)  # (src, dst, bytes, seconds)
    failed_block_ids: tuple[int, ...] = ()       # loads: vLLM blocks that did not get their KV


def geometry_of(kv_caches: dict[str, torch.Tensor], num_blocks: int, block_size: int, kv_heads: int,
                head_dim: int) -> tuple[KVGeometry, list[str], list[int]]:
    """The store geometry for these caches, the layer names in order and each layer's
    block dimension; LayoutError when a layer has no single num_blocks dimension or a
    block of it is not 2 x block_size x kv_heads x head_dim elements."""
    if not kv_caches:
        raise LayoutError("vLLM registered no KV cache tensors")
    names = list(kv_caches)
    dims = []
    dtype = None
    per_block = 2 * block_size * kv_heads * head_dim
    for name in names:
        t = kv_caches[name]
        if dtype is None:
            dtype = t.dtype
        if t.dtype != dtype:
            raise LayoutError(f"layer {name} has dtype {t.dtype}, others {dtype}")
        candidates = [d for d, n in enumerate(t.shape) if n == num_blocks]
        if len(candidates) != 1:
            raise LayoutError(f"layer {name} has shape {tuple(t.shape)}: no single dimension of "
                              f"{num_blocks} blocks")
        dim = candidates[0]
        if t.numel() // num_blocks != per_block:
            raise LayoutError(f"layer {name}: a block holds {t.numel() // num_blocks} elements, not "
                              f"2 x {block_size} x {kv_heads} x {head_dim}")
        dims.append(dim)
    assert dtype is not None
    return KVGeometry(len(names), kv_heads, head_dim, dtype, block_size), names, dims


class DataPath:
    """Runs save, move and load jobs on the worker; never raises for a job (a failure is
    a JobResult with ok=False)."""

    def __init__(self, store: TieredKVStore, kv_caches: dict[str, torch.Tensor], names: Sequence[str],
                 block_dims: Sequence[int], fault_file: str | None = None) -> None:
        self.store = store
        self.caches = [kv_caches[n] for n in names]
        self.dims = list(block_dims)
        self.layers = len(self.caches)
        self.fault_file = fault_file

    # ---- helpers ---------------------------------------------------------------------
    def _store_view(self, key: str, index: int) -> torch.Tensor:
        return self.store.block(key, index).reshape(-1).view(self.layers, -1)

    def _drop(self, key: str) -> None:
        try:
            self.store.discard(key)
        except Exception:      # unknown: nothing stored
            pass

    def _records(self, records: list[TransferRecord]) -> list[tuple[str, str, int, float]]:
        return [(r.src_tier, r.dst_tier, r.bytes, r.duration_s) for r in records]

    def _fault(self) -> str | None:
        """Test hook: a fault file (kv_connector_extra_config "fault_file") holding
        "load_half" makes the next loads fail half-way."""
        if not self.fault_file:
            return None
        try:
            with open(self.fault_file) as f:
                return f.read().strip() or None
        except OSError:
            return None

    # ---- jobs ------------------------------------------------------------------------
    def save(self, job: SaveJob) -> JobResult:
        """vLLM blocks -> store device tier (gather) -> host (swap_out) or SSD (offload)."""
        op = "swap_out" if job.dst == HOST else "offload"
        self._drop(job.key)          # a fresh copy of the whole context replaces an older one
        n = len(job.block_ids)
        try:
            t0 = time.monotonic()
            self.store.allocate(job.key, n)
            ids = torch.tensor(job.block_ids, dtype=torch.long, device=self.caches[0].device)
            for layer, (cache, dim) in enumerate(zip(self.caches, self.dims)):
                rows = cache.index_select(dim, ids).movedim(dim, 0).reshape(n, -1)
                for i in range(n):
                    self._store_view(job.key, i)[layer].copy_(rows[i])
            gather_s = time.monotonic() - t0
            legs = [("gpu", "gpu", n * self.store.block_bytes, gather_s)]
            transfer = self.store.swap_out(job.key) if job.dst == HOST else self.store.offload(job.key)
            legs += self._records(transfer.wait())
            return JobResult(job.job_id, job.key, op, True, n, legs=legs)
        except KVTierFull as exc:
            self._drop(job.key)
            return JobResult(job.job_id, job.key, op, False, n, reason=f"{job.dst} tier full: {exc}")
        except Exception as exc:
            log.exception("saving %d blocks of %s failed", n, job.key)
            self._drop(job.key)
            return JobResult(job.job_id, job.key, op, False, n, reason=f"{type(exc).__name__}: {exc}")

    def move(self, job: MoveJob) -> JobResult:
        try:
            if job.op == "discard":
                self.store.discard(job.key)
                return JobResult(job.job_id, job.key, job.op, True)
            if job.op == "offload":
                records = self.store.offload(job.key).wait()
                return JobResult(job.job_id, job.key, job.op, True, len(records) and records[0].blocks,
                                 legs=self._records(records))
            return JobResult(job.job_id, job.key, job.op, False, reason=f"unknown move {job.op!r}")
        except Exception as exc:
            return JobResult(job.job_id, job.key, job.op, False, reason=f"{type(exc).__name__}: {exc}")

    def load(self, job: LoadJob) -> JobResult:
        """Store (host/SSD) -> device tier (load) -> vLLM blocks (scatter). On a failure at
        block i, blocks i.. are reported failed (vLLM recomputes them); the ones before
        hold the right KV."""
        n = len(job.block_ids)
        done = 0
        legs: list[tuple[str, str, int, float]] = []
        try:
            placement = self.store.placement(job.key)
            have = placement.device_blocks + placement.host_blocks + placement.ssd_blocks
            if job.first + n > have:
                raise LookupError(f"the store holds {have} blocks of {job.key}, the load wants "
                                  f"{job.first}..{job.first + n}")
            legs += self._records(self.store.load(job.key).wait())
            fault = self._fault()
            t0 = time.monotonic()
            for i, block_id in enumerate(job.block_ids):
                if fault == "load_half" and i >= n // 2:
                    raise RuntimeError("fault injected (load_half)")
                src = self._store_view(job.key, job.first + i)
                for layer, (cache, dim) in enumerate(zip(self.caches, self.dims)):
                    dst = cache.select(dim, block_id)
                    dst.copy_(src[layer].view(dst.shape))
                done = i + 1
            legs.append(("gpu", "gpu", n * self.store.block_bytes, time.monotonic() - t0))
            if job.drop_after:
                self._drop(job.key)
            return JobResult(job.job_id, job.key, "load", True, n, legs=legs)
        except Exception as exc:
            log.warning("loading %s failed after %d of %d blocks (%s); vLLM recomputes the rest",
                        job.key, done, n, exc)
            self._drop(job.key)
            return JobResult(job.job_id, job.key, "load", False, n, reason=f"{type(exc).__name__}: {exc}",
                             legs=legs, failed_block_ids=tuple(job.block_ids[done:]))


def open_store(geometry: KVGeometry, staging_blocks: int, host_bytes: int, ssd_dir: str | None,
               ssd_bytes: int, device: str) -> TieredKVStore:
    """The connector's store: a device tier used as staging (one move at a time), the host
    pool and the SSD tier, sized in bytes."""
    bb = geometry.block_bytes
    ssd_blocks = ssd_bytes // bb if ssd_dir else 0
    if ssd_dir:
        os.makedirs(ssd_dir, exist_ok=True)
    return TieredKVStore(geometry, device_blocks=max(1, staging_blocks), host_blocks=host_bytes // bb,
                         ssd_dir=ssd_dir if ssd_blocks else None, ssd_blocks=ssd_blocks, on_full="error",
                         device=device)
