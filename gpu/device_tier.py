"""The KV store's device tier: one small interface, a CUDA and a CPU implementation.

    DeviceTier.pool            uint8 tensor [n_blocks, block_bytes] where blocks live
    DeviceTier.mark()          on the caller's thread: a point in its work that copies must follow
    DeviceTier.copy(pairs, after)  run the copies (dst, src) as one batch, return when all landed
    DeviceTier.copy_blocks(dst_pool, dst_slots, src_pool, src_slots, after)
                               block i of src_slots -> dst_slots[i], scattered on either side
    DeviceTier.host_addressable  True when pool memory can be handed to os.pwritev directly

`CudaDeviceTier` runs each batch on its own CUDA stream and waits on an event recorded
after the batch, so compute on the default stream overlaps the copies; the store calls
`copy` from its transfer thread, never from the engine's. `CpuDeviceTier` stands in when
there is no GPU: the pool is page-aligned host memory and a copy is a memmove on the
transfer thread alone, as one copy engine (kvstore_copy.py says why not torch there).
`choose_device_tier()` picks one at run time.
"""
from __future__ import annotations

import abc
from typing import Sequence

import numpy as np
import torch

from agentcg.gpu.hostmem import HostRegion
from agentcg.gpu.kvstore_copy import host_block_copy

FEW_RUNS = 8                  # up to this many runs: one plain copy per run


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

    def copy_blocks(self, dst_pool: torch.Tensor, dst_slots: np.ndarray, src_pool: torch.Tensor,
                    src_slots: np.ndarray, after: object | None = None) -> int:
        """Copy rows src_pool[src_slots[i]] -> dst_pool[dst_slots[i]]; returns the copies made.
        A few runs of consecutive rows are one copy each; blocks scattered as a paged
        engine leaves them are gathered or scattered in one indexed copy instead of one
        small copy per block (in host memory: one memmove per block in one C loop)."""
        if count_runs(src_slots, dst_slots) <= FEW_RUNS or dst_pool.device != src_pool.device:
            runs = block_runs(src_slots, dst_slots)
            self.copy([(dst_pool[d:d + k], src_pool[s:s + k]) for s, d, k in runs], after=after)
            return len(runs)
        return indexed_copy(dst_pool, dst_slots, src_pool, src_slots)

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

    def copy_blocks(self, dst_pool: torch.Tensor, dst_slots: np.ndarray, src_pool: torch.Tensor,
                    src_slots: np.ndarray, after: object | None = None) -> int:
        """Scattered blocks cross between host and GPU as one copy: gathered on the side they
        are scattered on (index_select on the GPU; numpy rows on the host, into pinned
        memory) and placed on the other. Not run on a host without a GPU (the CPU tier's
        path is what the tests and the bench there exercise)."""
        if count_runs(src_slots, dst_slots) <= FEW_RUNS:
            runs = block_runs(src_slots, dst_slots)
            self.copy([(dst_pool[d:d + k], src_pool[s:s + k]) for s, d, k in runs], after=after)
            return len(runs)
        n = len(src_slots)
        done = torch.cuda.Event()
        host_result: tuple[np.ndarray, torch.Tensor] | None = None
        with torch.cuda.stream(self.stream):
            if after is not None:
                self.stream.wait_event(after)  # type: ignore[arg-type]
            if src_pool.is_cuda:
                gathered = _wide(src_pool).index_select(0, _index(src_slots, src_pool.device)).view(torch.uint8)
                if dst_pool.is_cuda:
                    _wide(dst_pool).index_copy_(0, _index(dst_slots, dst_pool.device), _wide(gathered))
                elif _contiguous(dst_slots):
                    dst_pool[int(dst_slots[0]):int(dst_slots[0]) + n].copy_(gathered, non_blocking=True)
                else:
                    bounce = torch.empty(gathered.shape, dtype=gathered.dtype, pin_memory=True)
                    bounce.copy_(gathered, non_blocking=True)
                    host_result = (dst_slots, bounce)
            else:
                if _contiguous(src_slots):
                    rows = src_pool[int(src_slots[0]):int(src_slots[0]) + n]
                else:   # gathered on the host straight into pinned memory, then one copy
                    rows = torch.empty((n, src_pool.shape[1]), dtype=torch.uint8, pin_memory=True)
                    host_block_copy(rows, np.arange(n), src_pool, src_slots)
                staged = rows.to(self.device, non_blocking=True)
                _wide(dst_pool).index_copy_(0, _index(dst_slots, dst_pool.device), _wide(staged))
            done.record(self.stream)
        done.synchronize()
        if host_result is not None:
            host_block_copy(dst_pool, host_result[0], host_result[1], np.arange(n))
        return 1

    def close(self) -> None:
        self.pool = None  # type: ignore[assignment]


def _index(slots: np.ndarray, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(slots, dtype=np.int64)).to(device, non_blocking=True)


def block_runs(src: np.ndarray, dst: np.ndarray) -> list[tuple[int, int, int]]:
    """(src_start, dst_start, count) for maximal runs consecutive in both."""
    if len(src) == 0:
        return []
    breaks = np.flatnonzero((np.diff(src) != 1) | (np.diff(dst) != 1)) + 1
    starts = np.concatenate(([0], breaks))
    ends = np.concatenate((breaks, [len(src)]))
    return [(int(src[a]), int(dst[a]), int(b - a)) for a, b in zip(starts, ends)]


def count_runs(src: np.ndarray, dst: np.ndarray) -> int:
    """How many runs block_runs would give, without building them (a Python tuple per run
    cost 20-28 ms for 16,384 scattered blocks: a third of their copy)."""
    if len(src) == 0:
        return 0
    return 1 + int(np.count_nonzero((np.diff(src) != 1) | (np.diff(dst) != 1)))


def _contiguous(slots: np.ndarray) -> bool:
    return len(slots) > 0 and int(slots[-1]) - int(slots[0]) == len(slots) - 1 and bool(np.all(np.diff(slots) == 1))


def _wide(pool: torch.Tensor) -> torch.Tensor:
    """Rows of a uint8 pool as int64 elements where the row size allows: torch's index
    kernels work element by element, and on uint8 rows of 64 KiB and more index_select
    measured at a few percent of memcpy (CPU)."""
    return pool.view(torch.int64) if pool.shape[-1] % 8 == 0 else pool


def indexed_copy(dst_pool: torch.Tensor, dst_slots: np.ndarray, src_pool: torch.Tensor,
                 src_slots: np.ndarray) -> int:
    """One gather or scatter copy between pools on the same device: in host memory a
    memmove per block in one C loop (kvstore_copy.host_block_copy); on a GPU index_select
    or index_copy_ on int64 views of the rows."""
    if dst_pool.device.type == "cpu" and src_pool.device.type == "cpu":
        return host_block_copy(dst_pool, dst_slots, src_pool, src_slots)
    n = len(src_slots)
    src_index = torch.from_numpy(np.ascontiguousarray(src_slots, dtype=np.int64)).to(src_pool.device)
    if _contiguous(dst_slots):
        d = int(dst_slots[0])
        torch.index_select(_wide(src_pool), 0, src_index, out=_wide(dst_pool[d:d + n]))
        return 1
    dst_index = torch.from_numpy(np.ascontiguousarray(dst_slots, dtype=np.int64)).to(dst_pool.device)
    _wide(dst_pool).index_copy_(0, dst_index, _wide(src_pool)[src_index])
    return 1


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
        for dst, src in pairs:   # a memmove on this thread (torch's copy_ would wake its OpenMP workers)
            np.copyto(dst.numpy(), src.numpy())

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
