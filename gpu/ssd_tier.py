"""The KV store's SSD tier: one preallocated file of fixed-size block slots.

Slot i lives at offset i * block_bytes. Reads and writes move runs of consecutive slots
in large sequential I/Os (at most MAX_IO_BYTES each). The file is opened with O_DIRECT
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
from pathlib import Path

from agentcg.errors import HostUnsupported, InvalidInput
from agentcg.gpu.hostmem import HostRegion

MAX_IO_BYTES = 16 * 2**20
DIRECT_ALIGN_BYTES = 4096


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

    def _full(self, call, chunk: memoryview, offset: int) -> None:
        done = 0
        while done < len(chunk):
            n = call(self.fd, [chunk[done:]], offset + done)
            if n <= 0:
                raise HostUnsupported(f"SSD tier: short {call.__name__} at offset {offset + done} of {self.path}")
            done += n

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
