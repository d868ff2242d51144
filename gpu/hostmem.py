"""Page-aligned, page-locked host memory for the KV store's host pool and staging.

A region is an anonymous mmap reserved once at its maximum size (MAP_NORESERVE), so its
address never moves; only the first `locked_bytes` are locked. Page alignment is what
O_DIRECT needs; page locking is what makes host<->device copies DMA without a bounce.

How a region is locked is recorded in `lock_method`:
  "cudaHostRegister"  with CUDA: the CUDA driver pins the pages and maps them for DMA;
  "mlock"             without CUDA (torch's pin_memory needs a CUDA device): mlock(2) keeps
                      the pages resident and unswappable, which is all a CPU device tier needs;
  "none: <why>"       locking failed (RLIMIT_MEMLOCK without CAP_IPC_LOCK); copies still work.
"""
from __future__ import annotations

import ctypes
import mmap
import os

import torch

from agentcg.errors import HostUnsupported, InvalidInput

PAGE_BYTES = mmap.PAGESIZE
_MAP_NORESERVE = 0x4000  # Linux; Python 3.11's mmap does not export it


def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(None, use_errno=True)
    for name in ("mlock", "munlock"):
        getattr(libc, name).argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        getattr(libc, name).restype = ctypes.c_int
    return libc


def _round_up(value: int, unit: int) -> int:
    return -(-value // unit) * unit


class HostRegion:
    """`max_bytes` of page-aligned host memory; `tensor` is a flat uint8 view of all of it."""

    def __init__(self, max_bytes: int, *, locked_bytes: int = 0, use_cuda: bool = False,
                 populate: bool = False) -> None:
        if max_bytes <= 0:
            raise InvalidInput(f"host region: size must be positive, got {max_bytes} bytes")
        self.max_bytes = _round_up(max_bytes, PAGE_BYTES)
        flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_NORESERVE
        if populate:
            flags |= mmap.MAP_POPULATE
        self._mmap = mmap.mmap(-1, self.max_bytes, flags=flags)
        # Huge pages where THP allows it ("madvise" mode): physically contiguous 2 MiB pieces
        # make O_DIRECT requests carry fewer, larger segments. Measured: with 4 KiB pages,
        # reusing freed (fragmented) memory cut O_DIRECT bandwidth by a third.
        if self.max_bytes >= 2 * 2**20 and hasattr(mmap, "MADV_HUGEPAGE"):
            self._mmap.madvise(mmap.MADV_HUGEPAGE)
        self.tensor = torch.frombuffer(self._mmap, dtype=torch.uint8)
        self.address = self.tensor.data_ptr()
        self._use_cuda = use_cuda
        self._libc = _libc()
        self.locked_bytes = 0
        self.lock_method = "none: not locked"
        if locked_bytes:
            self.lock(locked_bytes)

    def view(self, offset_bytes: int, length_bytes: int) -> memoryview:
        """A buffer for os.preadv/pwritev; page-aligned when offset_bytes is."""
        return memoryview(self._mmap)[offset_bytes:offset_bytes + length_bytes]

    def lock(self, nbytes: int) -> None:
        """Lock exactly the first `nbytes` (rounded to pages): grows or shrinks the locked part."""
        nbytes = _round_up(nbytes, PAGE_BYTES)
        if nbytes > self.max_bytes:
            raise InvalidInput(
                f"host region: cannot lock {nbytes} bytes of a region reserved at {self.max_bytes}; "
                "create the store with a larger host_max_blocks")
        self._unlock()
        if nbytes == 0:
            return
        if self._use_cuda:
            err = torch.cuda.cudart().cudaHostRegister(self.address, nbytes, 0)
            if int(err) != 0:
                raise HostUnsupported(f"cudaHostRegister of {nbytes} bytes failed with CUDA error {int(err)}")
            self.lock_method = "cudaHostRegister"
        elif self._libc.mlock(self.address, nbytes) == 0:
            self.lock_method = "mlock"
        else:
            errno = ctypes.get_errno()
            self.lock_method = f"none: mlock failed ({os.strerror(errno)}; raise RLIMIT_MEMLOCK or run as root)"
        self.locked_bytes = nbytes

    def _unlock(self) -> None:
        if self.locked_bytes:
            if self.lock_method == "cudaHostRegister":
                torch.cuda.cudart().cudaHostUnregister(self.address)
            elif self.lock_method == "mlock":
                self._libc.munlock(self.address, self.locked_bytes)
        self.locked_bytes = 0
        self.lock_method = "none: not locked"

    def release_pages(self, offset_bytes: int, length_bytes: int) -> None:
        """Give unlocked pages back to the kernel (after the pool shrinks)."""
        if length_bytes > 0:
            self._mmap.madvise(mmap.MADV_DONTNEED, offset_bytes, length_bytes)

    def close(self) -> None:
        if self._mmap.closed:
            return
        self._unlock()
        self.tensor = None  # type: ignore[assignment]
        try:
            self._mmap.close()
        except BufferError:
            # A caller still holds a view of a block; the mapping goes when that view does.
            pass
