"""The KV store's SSD tier: one preallocated file of fixed-size block slots.

Slot i lives at offset i * block_bytes. Reads and writes move runs of consecutive slots
in large sequential I/Os (at most MAX_IO_BYTES each); blocks scattered in memory go as
many iovecs of one I/O, and separate file ranges as IO_DEPTH I/Os in flight. The file is opened with O_DIRECT
when the filesystem takes it and the block size is a multiple of 4 KiB, so the page cache
neither holds KV data nor flatters read bandwidth; otherwise it is written buffered,
followed by fdatasync and posix_fadvise(DONTNEED) on the range so that a later read comes
from the device too. `io_mode` says which ("o_direct" or "buffered+fdatasync+fadvise").

The file is unlinked as soon as it is open: it is scratch space, and a crashed process
leaves nothing behind in the directory.
"""
from __future__ import annotations

import errno
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from agentcg.errors import HostUnsupported, InvalidInput
from agentcg.gpu.hostmem import HostRegion
from agentcg.gpu.kvstore_iov import IoPlan, run_ios

MAX_IO_BYTES = 16 * 2**20
DIRECT_ALIGN_BYTES = 4096
IOV_MAX = 1024            # iovecs one preadv/pwritev takes (Linux UIO_MAXIOV)
IO_DEPTH = 4              # I/Os in flight when a move touches several separate file ranges


class SsdTier:
    def __init__(self, directory: str | os.PathLike, n_blocks: int, block_bytes: int,
                 *, direct_io: bool | None = None) -> None:
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise InvalidInput(f"SSD tier: {self.directory} is not a directory; create it or pass another ssd_dir")
        self.n_blocks = n_blocks
        self.block_bytes = block_bytes
        self.path = self.directory / f".agentcg-kv-{os.getpid()}-{id(self):x}.blocks"
        want_direct = direct_io is not False and block_bytes % DIRECT_ALIGN_BYTES == 0
        if direct_io and not want_direct:
            raise InvalidInput(
                f"SSD tier: O_DIRECT needs a block size that is a multiple of {DIRECT_ALIGN_BYTES} bytes, "
                f"got {block_bytes}; change tokens_per_block or pass direct_io=None")
        self.fd = -1
        self._pool: ThreadPoolExecutor | None = None
        self.io_mode = "buffered+fdatasync+fadvise"
        try:
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
            os.unlink(self.path)
            size = n_blocks * block_bytes
            if size:
                os.posix_fallocate(self.fd, 0, size)
            if want_direct and self._try_direct():
                self.io_mode = "o_direct"
            elif direct_io:
                raise HostUnsupported(
                    f"SSD tier: the filesystem of {self.directory} refuses O_DIRECT; pass direct_io=None")
        except OSError as exc:
            self.close()
            if exc.errno == errno.ENOSPC:
                raise HostUnsupported(
                    f"SSD tier: no space for {n_blocks} blocks of {block_bytes} bytes in {self.directory}") from None
            raise HostUnsupported(f"SSD tier: cannot use {self.directory}: {exc.strerror}") from None
        except BaseException:
            self.close()
            raise

    def _try_direct(self) -> bool:
        """Reopen with O_DIRECT and prove an aligned read works (some filesystems open but refuse I/O)."""
        try:
            direct_fd = os.open(f"/proc/self/fd/{self.fd}", os.O_RDWR | os.O_DIRECT)
        except OSError:
            return False
        probe = HostRegion(DIRECT_ALIGN_BYTES)
        try:
            if self.n_blocks:
                os.preadv(direct_fd, [probe.view(0, DIRECT_ALIGN_BYTES)], 0)
        except OSError:
            os.close(direct_fd)
            return False
        finally:
            probe.close()
        os.close(self.fd)
        self.fd = direct_fd
        return True

    def _check(self, slot: int, buffer: memoryview) -> None:
        count = len(buffer) // self.block_bytes
        if len(buffer) % self.block_bytes or slot < 0 or slot + count > self.n_blocks:
            raise InvalidInput(f"SSD tier: slots {slot}..{slot + count} outside 0..{self.n_blocks}")

    def write(self, slot: int, buffer: memoryview) -> int:
        """Write whole blocks from `buffer` (page-aligned for O_DIRECT) starting at `slot`; returns I/Os."""
        self._check(slot, buffer)
        offset = slot * self.block_bytes
        ios = 0
        for start in range(0, len(buffer), MAX_IO_BYTES):
            chunk = buffer[start:start + MAX_IO_BYTES]
            self._full(os.pwritev, chunk, offset + start)
            ios += 1
        if self.io_mode != "o_direct" and len(buffer):
            os.fdatasync(self.fd)
            os.posix_fadvise(self.fd, offset, len(buffer), os.POSIX_FADV_DONTNEED)
        return ios

    def read(self, slot: int, buffer: memoryview) -> int:
        """Fill `buffer` with whole blocks starting at `slot`; returns the number of I/Os."""
        self._check(slot, buffer)
        offset = slot * self.block_bytes
        ios = 0
        for start in range(0, len(buffer), MAX_IO_BYTES):
            self._full(os.preadv, buffer[start:start + MAX_IO_BYTES], offset + start)
            ios += 1
        return ios

    def write_gather(self, items: list[tuple[int, list[memoryview]]]) -> int:
        """Write several file ranges, each from several buffers (blocks scattered in memory):
        (first slot, buffers in slot order). One pwritev per range (up to IOV_MAX buffers
        and MAX_IO_BYTES), ranges IO_DEPTH at a time. Returns the number of I/Os."""
        ios = self._many(os.pwritev, items)
        if self.io_mode != "o_direct" and items:
            os.fdatasync(self.fd)
            for slot, buffers in items:
                os.posix_fadvise(self.fd, slot * self.block_bytes, sum(map(len, buffers)), os.POSIX_FADV_DONTNEED)
        return ios

    def read_scatter(self, items: list[tuple[int, list[memoryview]]]) -> int:
        """Read several file ranges into several buffers each; as write_gather."""
        return self._many(os.preadv, items)

    def run_plan(self, plan: IoPlan, *, write: bool) -> int:
        """Run an I/O plan built by kvstore_iov.plan_ios over this file (file offsets in
        bytes), IO_DEPTH I/Os in flight; returns the number of I/Os."""
        if plan.n_ios and int(plan.offsets[-1] + plan.sizes[-1]) > self.n_blocks * self.block_bytes:
            raise InvalidInput(f"SSD tier: an I/O runs past the file's {self.n_blocks} slots")
        if self._pool is None and plan.n_ios > 1:
            self._pool = ThreadPoolExecutor(max_workers=IO_DEPTH, thread_name_prefix="agentcg-kv-io")
        ios = run_ios(self.fd, plan, write=write, pool=self._pool)
        if write and self.io_mode != "o_direct" and ios:
            os.fdatasync(self.fd)
            for offset, size in zip(plan.offsets.tolist(), plan.sizes.tolist()):
                os.posix_fadvise(self.fd, offset, size, os.POSIX_FADV_DONTNEED)
        return ios

    def _many(self, call, items: list[tuple[int, list[memoryview]]]) -> int:
        pieces: list[tuple[int, list[memoryview]]] = []
        for slot, buffers in items:
            if slot < 0 or any(len(buf) % self.block_bytes for buf in buffers):
                raise InvalidInput(f"SSD tier: buffers for slot {slot} must be whole blocks at a slot >= 0")
            offset, group, size = slot * self.block_bytes, [], 0
            split = [buf[i:i + MAX_IO_BYTES] for buf in buffers for i in range(0, len(buf), MAX_IO_BYTES)]
            for buf in split:
                if group and (len(group) == IOV_MAX or size + len(buf) > MAX_IO_BYTES):
                    pieces.append((offset, group))
                    offset, group, size = offset + size, [], 0
                group.append(buf)
                size += len(buf)
            if group:
                pieces.append((offset, group))
            if offset + size > self.n_blocks * self.block_bytes:
                raise InvalidInput(f"SSD tier: slots from {slot} run past {self.n_blocks}")
        if len(pieces) <= 1:
            for offset, group in pieces:
                self._full_v(call, group, offset)
            return len(pieces)
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=IO_DEPTH, thread_name_prefix="agentcg-kv-io")
        for future in [self._pool.submit(self._full_v, call, group, offset) for offset, group in pieces]:
            future.result()
        return len(pieces)

    def _full_v(self, call, buffers: list[memoryview], offset: int) -> None:
        """All of `buffers` at `offset`, resuming after a short transfer."""
        while buffers:
            n = call(self.fd, buffers, offset)
            if n <= 0:
                raise HostUnsupported(f"SSD tier: short {call.__name__} at offset {offset} of {self.path}")
            offset += n
            while buffers and n >= len(buffers[0]):
                n -= len(buffers[0])
                buffers = buffers[1:]
            if buffers and n:
                buffers = [buffers[0][n:], *buffers[1:]]

    def _full(self, call, chunk: memoryview, offset: int) -> None:
        done = 0
        while done < len(chunk):
            n = call(self.fd, [chunk[done:]], offset + done)
            if n <= 0:
                raise HostUnsupported(f"SSD tier: short {call.__name__} at offset {offset + done} of {self.path}")
            done += n

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
