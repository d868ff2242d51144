"""Block copies between pools in host memory (the CPU device tier, the host pool, the
bounce and staging buffers of the tiered KV store), on the calling thread alone.

A pool is a uint8 tensor [n_blocks, block_bytes]. Numpy sees it as a 1-D array of opaque
block-sized items (dtype "V<block_bytes>"), so a gather (`np.take`) or a scatter (fancy
assignment) moves each block with one memmove, in one C loop over the slot list, with the
GIL released. Why not torch: measured on this 2-core host, `index_select` on uint8 rows of
64 KiB and more ran at 0.03-0.12 of memcpy (a slow kernel for wide byte rows), `index_copy_`
at a tenth, and torch's intra-op OpenMP workers spin after each copy, taking the CPU from
the SSD I/O that overlaps the copy (an O_DIRECT write beside a torch gather: 0.27 of the
ceiling; beside the same gather in numpy: 0.93). One thread also matches what the CPU tier
stands in for: one copy engine of a GPU.
"""
from __future__ import annotations

import numpy as np
import torch

from agentcg.errors import InvalidInput

SCATTER_CHUNK_ROWS = 1024     # rows per temporary when both sides are scattered


def block_items(pool: torch.Tensor) -> np.ndarray:
    """The pool's blocks as a 1-D numpy array of block-sized opaque items (no copy)."""
    if pool.dim() != 2 or pool.dtype != torch.uint8 or pool.device.type != "cpu" or not pool.is_contiguous():
        raise InvalidInput(f"host block copy: expected a contiguous CPU uint8 pool [blocks, bytes], "
                           f"got {tuple(pool.shape)} {pool.dtype} on {pool.device}")
    array = pool.numpy()
    return array.view(f"V{array.shape[1]}").reshape(-1)


def _checked(slots: np.ndarray, n_items: int) -> np.ndarray:
    slots = np.ascontiguousarray(slots, dtype=np.intp)
    if slots.size and (int(slots.min()) < 0 or int(slots.max()) >= n_items):
        raise InvalidInput(f"host block copy: slots must be in 0..{n_items - 1}")
    return slots


def contiguous_start(slots: np.ndarray) -> int | None:
    """The first slot when `slots` is one run of consecutive slots, else None."""
    if len(slots) == 0:
        return None
    first = int(slots[0])
    if int(slots[-1]) - first != len(slots) - 1 or (len(slots) > 1 and not bool(np.all(np.diff(slots) == 1))):
        return None
    return first


def copy_run(dst_pool: torch.Tensor, dst_start: int, src_pool: torch.Tensor, src_start: int, count: int) -> None:
    """Consecutive blocks: one memmove (numpy copyto of contiguous bytes)."""
    np.copyto(dst_pool.numpy()[dst_start:dst_start + count], src_pool.numpy()[src_start:src_start + count])


def host_block_copy(dst_pool: torch.Tensor, dst_slots: np.ndarray, src_pool: torch.Tensor,
                    src_slots: np.ndarray) -> int:
    """src_pool[src_slots[i]] -> dst_pool[dst_slots[i]] for every i; returns the copy calls
    made (1 for a gather into or a scatter from consecutive slots). Pools may be the same
    one if source and destination slots do not overlap."""
    if len(dst_slots) != len(src_slots):
        raise InvalidInput(f"host block copy: {len(src_slots)} source slots but {len(dst_slots)} destinations")
    n = len(src_slots)
    if n == 0:
        return 0
    dst, src = block_items(dst_pool), block_items(src_pool)
    if dst.dtype.itemsize != src.dtype.itemsize:
        raise InvalidInput(f"host block copy: block sizes differ ({src.dtype.itemsize} -> {dst.dtype.itemsize} bytes)")
    d0, s0 = contiguous_start(dst_slots), contiguous_start(src_slots)
    if d0 is not None and s0 is not None:
        copy_run(dst_pool, d0, src_pool, s0, n)
        return 1
    if d0 is not None:
        # mode="clip" (indices checked above): with the default "raise", numpy buffers `out`.
        np.take(src, _checked(src_slots, len(src)), out=dst[_run(d0, n, len(dst))], mode="clip")
        return 1
    dst_index = _checked(dst_slots, len(dst))
    if s0 is not None:
        dst[dst_index] = src[_run(s0, n, len(src))]
        return 1
    src_index = _checked(src_slots, len(src))
    for start in range(0, n, SCATTER_CHUNK_ROWS):   # both scattered: a bounded temporary
        part = slice(start, start + SCATTER_CHUNK_ROWS)
        dst[dst_index[part]] = np.take(src, src_index[part], mode="clip")
    return -(-n // SCATTER_CHUNK_ROWS)


def _run(start: int, n: int, n_items: int) -> slice:
    if start < 0 or start + n > n_items:
        raise InvalidInput(f"host block copy: slots {start}..{start + n - 1} outside 0..{n_items - 1}")
    return slice(start, start + n)
