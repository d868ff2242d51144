"""KV-cache geometry, transfer records and the store's errors: the types an engine sees."""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from agentcg.errors import AgentcgError, InvalidInput

DTYPES: dict[str, torch.dtype] = {
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16,
    "fp32": torch.float32, "float32": torch.float32,
    "fp8": torch.float8_e4m3fn, "float8_e4m3fn": torch.float8_e4m3fn,
}
TIER_NAMES = ("device", "host", "ssd")


class KVTierFull(AgentcgError):
    """A tier has no room for the blocks an operation needs (and spilling is off or impossible)."""


class KVStateError(InvalidInput):
    """An operation that the request's state does not allow: unknown request, block not on device."""


@dataclass(frozen=True)
class KVGeometry:
    """One block holds K and V of `tokens_per_block` tokens for every layer.

    A block tensor has shape (2, layers, tokens_per_block, kv_heads, head_dim) and `dtype`;
    `dtype` may be given as a torch dtype or a name (bf16, fp16, fp32, fp8).
    Llama-3-8B: KVGeometry(32, 8, 128, "bf16", 16) -> 128 KiB per token, 2 MiB per block.
    """

    layers: int
    kv_heads: int
    head_dim: int
    dtype: torch.dtype | str = torch.bfloat16
    tokens_per_block: int = 16

    def __post_init__(self) -> None:
        for name in ("layers", "kv_heads", "head_dim", "tokens_per_block"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise InvalidInput(f"KV geometry: {name} must be a positive integer, got {value!r}")
        if isinstance(self.dtype, str):
            if self.dtype.lower() not in DTYPES:
                raise InvalidInput(f"KV geometry: unknown dtype {self.dtype!r}; use one of bf16, fp16, fp32, fp8")
            object.__setattr__(self, "dtype", DTYPES[self.dtype.lower()])
        elif not isinstance(self.dtype, torch.dtype):
            raise InvalidInput(f"KV geometry: dtype must be a torch dtype or a name, got {self.dtype!r}")

    @property
    def block_shape(self) -> tuple[int, int, int, int, int]:
        return (2, self.layers, self.tokens_per_block, self.kv_heads, self.head_dim)

    @property
    def bytes_per_token(self) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * self.dtype.itemsize

    @property
    def block_bytes(self) -> int:
        return self.bytes_per_token * self.tokens_per_block


@dataclass(frozen=True)
class TransferRecord:
    """One batched move of a request's blocks from one tier to another.

    `copies` is how many copy calls or I/Os carried it (runs of consecutive slots become
    one each); `path` names the mechanism (CUDA stream or CPU memcpy, how the host pool is
    locked, O_DIRECT or buffered I/O, staging). Times are time.monotonic() seconds.
    """

    request_id: str
    op: str
    src_tier: str
    dst_tier: str
    blocks: int
    bytes: int
    start_s: float
    end_s: float
    copies: int
    path: str

    @property
    def duration_s(self) -> float:
        return self.end_s - self.start_s

    @property
    def bandwidth_bytes_per_s(self) -> float:
        return self.bytes / self.duration_s if self.duration_s > 0 else float("inf")


class TierUsage(NamedTuple):
    tier: str
    capacity_blocks: int
    used_blocks: int
    block_bytes: int

    @property
    def free_blocks(self) -> int:
        return self.capacity_blocks - self.used_blocks

    @property
    def used_bytes(self) -> int:
        return self.used_blocks * self.block_bytes

    @property
    def capacity_bytes(self) -> int:
        return self.capacity_blocks * self.block_bytes


class StoreUsage(NamedTuple):
    device: TierUsage
    host: TierUsage
    ssd: TierUsage
    requests: int
    transfers_in_flight: int


class Placement(NamedTuple):
    """Where one request's blocks are, counted per tier."""

    device_blocks: int
    host_blocks: int
    ssd_blocks: int
