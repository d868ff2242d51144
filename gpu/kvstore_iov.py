"""Scattered blocks to and from the KV store's SSD file with no copy and no per-block Python:
the iovec arrays of `pwritev`/`preadv` are built with numpy from the slot lists, and each
I/O is one libc call through ctypes (the GIL is released for its duration), several in
flight at a time from a small thread pool.

    plan = plan_ios(file_offsets, addresses, lengths)   # one entry per memory run, any order
    n_ios = run_ios(fd, plan, write=True, pool=executor)

An I/O covers consecutive bytes of the file, at most IOV_MAX iovecs and MAX_IO_BYTES; runs
longer than PIECE_BYTES are cut into PIECE_BYTES iovecs first so every I/O fits its byte
budget. Building 16,384 memoryviews (one per 16 KiB block) and the Python loop over them
cost more than the copy itself; here the per-move Python work is a few numpy operations
and one call per I/O.
"""
from __future__ import annotations

import ctypes
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from agentcg.errors import HostUnsupported

IOV_MAX = 1024                 # iovecs one preadv/pwritev takes (Linux UIO_MAXIOV)
MAX_IO_BYTES = 16 * 2**20      # bytes per I/O
PIECE_BYTES = 2**20            # longest iovec: a run longer than this is cut

_LIBC = ctypes.CDLL(None, use_errno=True)
for _name in ("pwritev", "preadv"):
    _fn = getattr(_LIBC, _name)
    _fn.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_longlong]
    _fn.restype = ctypes.c_ssize_t


@dataclass(frozen=True)
class IoPlan:
    iov: np.ndarray        # uint64 [n_iovecs, 2]: (address, length), struct iovec's layout
    starts: np.ndarray     # first iovec of each I/O, plus len(iov) at the end
    offsets: np.ndarray    # file offset of each I/O
    sizes: np.ndarray      # bytes of each I/O

    @property
    def n_ios(self) -> int:
        return len(self.offsets)


def run_arrays(src: np.ndarray, dst: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(src starts, dst starts, counts) of the maximal runs consecutive in both, as arrays."""
    src, dst = np.asarray(src, dtype=np.int64), np.asarray(dst, dtype=np.int64)
    if len(src) == 0:
        empty = np.empty(0, dtype=np.int64)
        return empty, empty, empty
    first = np.ones(len(src), dtype=bool)
    first[1:] = (np.diff(src) != 1) | (np.diff(dst) != 1)
    starts = np.flatnonzero(first)
    return src[starts], dst[starts], np.diff(np.append(starts, len(src)))


def plan_ios(file_offsets: np.ndarray, addresses: np.ndarray, lengths: np.ndarray) -> IoPlan:
    """Group memory runs (file offset, memory address, bytes) into I/Os over consecutive
    file bytes. Runs may come in any order and must not overlap in the file."""
    order = np.argsort(file_offsets, kind="stable")
    f = np.asarray(file_offsets, dtype=np.int64)[order]
    a = np.asarray(addresses, dtype=np.uint64)[order]
    n = np.asarray(lengths, dtype=np.int64)[order]
    if n.size and int(n.max()) > PIECE_BYTES:      # cut long runs into PIECE_BYTES iovecs
        pieces = -(-n // PIECE_BYTES)
        run = np.repeat(np.arange(len(n)), pieces)
        within = np.arange(len(run)) - np.repeat(np.cumsum(pieces) - pieces, pieces)
        step = within * PIECE_BYTES
        f, a = f[run] + step, a[run] + step.astype(np.uint64)
        n = np.minimum(n[run] - step, PIECE_BYTES)
    if len(n) == 0:
        empty = np.empty(0, dtype=np.int64)
        return IoPlan(np.empty((0, 2), dtype=np.uint64), np.zeros(1, dtype=np.int64), empty, empty)
    # A new I/O where the file bytes stop being consecutive, ...
    new = np.ones(len(n), dtype=bool)
    new[1:] = f[1:] != f[:-1] + n[:-1]
    segment = np.cumsum(new) - 1
    seg_first = np.flatnonzero(new)
    # ... where the I/O's bytes would pass MAX_IO_BYTES (grouping by start offset in budgets
    # of MAX - longest + 1 bytes keeps each I/O within MAX; when every run has one length
    # that divides MAX, budgets of MAX do, and 16 KiB runs fill 16 MiB I/Os exactly), ...
    before = f - f[seg_first][segment]
    longest = int(n.max())
    uniform = int(n.min()) == longest and MAX_IO_BYTES % longest == 0
    budget = before // (MAX_IO_BYTES if uniform else MAX_IO_BYTES - longest + 1)
    new[1:] |= budget[1:] != budget[:-1]
    # ... and every IOV_MAX iovecs.
    group_first = np.flatnonzero(new)
    index_in_group = np.arange(len(n)) - np.repeat(group_first, np.diff(np.append(group_first, len(n))))
    new |= (index_in_group % IOV_MAX) == 0
    starts = np.append(np.flatnonzero(new), len(n)).astype(np.int64)
    sizes = np.add.reduceat(n, starts[:-1])
    iov = np.empty((len(n), 2), dtype=np.uint64)
    iov[:, 0], iov[:, 1] = a, n.astype(np.uint64)
    return IoPlan(iov, starts, f[starts[:-1]], sizes)


def run_ios(fd: int, plan: IoPlan, *, write: bool, pool: ThreadPoolExecutor | None) -> int:
    """Run every I/O of the plan (in flight as many at a time as the pool has threads);
    returns the number of I/Os."""
    if plan.n_ios == 0:
        return 0
    if pool is None or plan.n_ios == 1:
        for i in range(plan.n_ios):
            _one(fd, plan, i, write)
    else:
        for future in [pool.submit(_one, fd, plan, i, write) for i in range(plan.n_ios)]:
            future.result()
    return plan.n_ios


def _one(fd: int, plan: IoPlan, i: int, write: bool) -> None:
    call = _LIBC.pwritev if write else _LIBC.preadv
    first, last = int(plan.starts[i]), int(plan.starts[i + 1])
    offset, want = int(plan.offsets[i]), int(plan.sizes[i])
    iov = plan.iov
    done = call(fd, iov.ctypes.data + first * 16, last - first, offset)
    if done == want:
        return
    if done < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"SSD tier: {'pwritev' if write else 'preadv'} at offset {offset}: {os.strerror(err)}")
    # A short transfer (rare on a regular file): the rest, iovec by iovec.
    position = offset
    for address, length in iov[first:last].tolist():
        skip = min(done, length)
        done -= skip
        address, length, position = address + skip, length - skip, position + skip
        while length:
            one = np.array([[address, length]], dtype=np.uint64)
            n = call(fd, one.ctypes.data, 1, position)
            if n <= 0:
                raise HostUnsupported(f"SSD tier: short {'pwritev' if write else 'preadv'} at offset {position}")
            address, length, position = address + n, length - n, position + n
