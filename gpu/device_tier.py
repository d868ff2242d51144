"""The KV store's device tier: one small interface, a CUDA and a CPU implementation.

    DeviceTier.pool            uint8 tensor [n_blocks, block_bytes] where blocks live
    DeviceTier.mark()          on the caller's thread: a point in its work that copies must follow
    DeviceTier.copy(pairs, after)  run the copies (dst, src) as one batch, return when all landed
    DeviceTier.host_addressable  True when pool memory can be handed to os.pwritev directly

`CudaDeviceTier` runs each batch on its own CUDA stream and waits on an event recorded
after the batch, so compute on the default stream overlaps the copies; the store calls
`copy` from its transfer thread, never from the engine's. `CpuDeviceTier` stands in when
there is no GPU: the pool is page-aligned host memory and a copy is a torch memcpy.
`choose_device_tier()` picks one at run time.
"""
from __future__ import annotations

import abc
from typing import Sequence

import torch

from agentcg.gpu.hostmem import HostRegion


class DeviceTier(abc.ABC):
    kind: str
    host_addressable: bool
    pool: torch.Tensor

    def mark(self) -> object | None:
        """Called where the engine submits a move: what the copies must wait for."""
        return None

    @abc.abstractmethod
    def copy(self, pairs: Sequence[tuple[torch.Tensor, torch.Tensor]], after: object | None = None) -> None:
        """Copy every src into its dst after `after` (from mark()); return once all are complete."""

    def close(self) -> None:
        """Free the pool."""


class CudaDeviceTier(DeviceTier):
    kind = "cuda"
    host_addressable = False

    def __init__(self, n_blocks: int, block_bytes: int, device: str = "cuda") -> None:
        self.device = torch.device(device)
        self.pool = torch.empty((n_blocks, block_bytes), dtype=torch.uint8, device=self.device)
        self.stream = torch.cuda.Stream(device=self.device)

    def mark(self) -> object | None:
        # Pool writes the engine queued on its current stream must land before we copy.
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))
        return event

    def copy(self, pairs: Sequence[tuple[torch.Tensor, torch.Tensor]], after: object | None = None) -> None:
        done = torch.cuda.Event()
        with torch.cuda.stream(self.stream):
            if after is not None:
                self.stream.wait_event(after)  # type: ignore[arg-type]
            for dst, src in pairs:
                dst.copy_(src, non_blocking=True)
            done.record(self.stream)
        done.synchronize()

    def close(self) -> None:
        self.pool = None  # type: ignore[assignment]


class CpuDeviceTier(DeviceTier):
    kind = "cpu"
    host_addressable = True

    def __init__(self, n_blocks: int, block_bytes: int) -> None:
        # Locked like GPU memory is never swapped; O_DIRECT into locked pages also measured
        # markedly faster here than into merely populated ones (pages already pinned).
        self._region = HostRegion(max(n_blocks * block_bytes, 1), locked_bytes=n_blocks * block_bytes)
        self.pool = self._region.tensor[: n_blocks * block_bytes].view(n_blocks, block_bytes)
        self.region = self._region

    def copy(self, pairs: Sequence[tuple[torch.Tensor, torch.Tensor]], after: object | None = None) -> None:
        for dst, src in pairs:
            dst.copy_(src)

    def close(self) -> None:
        self.pool = None  # type: ignore[assignment]
        self._region.close()


def cuda_available() -> bool:
    return torch.cuda.is_available()


def choose_device_tier(n_blocks: int, block_bytes: int, kind: str = "auto") -> DeviceTier:
    """'auto' -> CUDA when torch sees a GPU, else CPU; 'cuda' or 'cpu' to force one."""
    from agentcg.errors import HostUnsupported, InvalidInput

    if kind not in ("auto", "cuda", "cpu"):
        raise InvalidInput(f"device tier: expected auto, cuda or cpu, got {kind!r}")
    if kind == "cuda" and not cuda_available():
        raise HostUnsupported("device tier 'cuda' requested but torch sees no CUDA device; use 'cpu' or 'auto'")
    if kind == "cuda" or (kind == "auto" and cuda_available()):
        return CudaDeviceTier(n_blocks, block_bytes)
    return CpuDeviceTier(n_blocks, block_bytes)
