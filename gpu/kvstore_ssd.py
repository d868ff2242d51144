"""How the tiered KV store (kvstore.py) moves blocks to and from the SSD: one I/O per file
range with the memory runs as iovecs, small scattered runs through a double-buffered bounce
buffer, and device blocks through the bounded staging buffer. A mixin of `TieredKVStore`."""
from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch

from agentcg.gpu.device_tier import FEW_RUNS, block_runs, indexed_copy
from agentcg.gpu.hostmem import HostRegion


BOUNCE_BYTES = 16 * 2**20          # two halves: one gathers while the other is in flight
BOUNCE_BELOW_BYTES = 256 * 2**10   # memory runs smaller than this on average go through it


class SsdCopies:
    """Mixin of `TieredKVStore`: blocks between memory (host, device or staging) and the SSD."""

    def _ssd_io(self, to_ssd: bool, region: HostRegion, mem_slots: np.ndarray, ssd_slots: np.ndarray,
                pool: torch.Tensor | None = None) -> int:
        """Blocks between memory (`region`, slots of block_bytes) and the SSD file: each range
        of consecutive file slots is one I/O whose iovecs are the memory runs it maps to,
        and separate ranges go several at a time (SsdTier.write_gather/read_scatter). Small
        scattered runs (under BOUNCE_BELOW_BYTES on average) go through a double-buffered
        bounce buffer instead: gathered into it with one indexed copy while the previous
        piece is written (or read into it while the previous piece is scattered), because an
        O_DIRECT I/O of many small segments measured several times slower than one of a few."""
        bb = self.block_bytes
        if len(ssd_slots) == 0:
            return 0
        order = np.argsort(ssd_slots, kind="stable")
        ssd, mem = ssd_slots[order], mem_slots[order]
        runs = block_runs(ssd, mem)
        if pool is not None and len(runs) > FEW_RUNS and len(ssd) * bb / len(runs) < BOUNCE_BELOW_BYTES:
            return self._bounced(to_ssd, pool, mem, ssd)
        items: list[tuple[int, list[memoryview]]] = []
        end = -1   # the file slot after the last item's range
        for s, m, k in runs:
            if s == end:
                items[-1][1].append(region.view(m * bb, k * bb))   # same file range, next memory run
            else:
                items.append((s, [region.view(m * bb, k * bb)]))
            end = s + k
        if len(items) == 1 and len(items[0][1]) == 1:   # one contiguous range: the plain path
            slot, (buffer,) = items[0]
            return self.ssd.write(slot, buffer) if to_ssd else self.ssd.read(slot, buffer)
        return self.ssd.write_gather(items) if to_ssd else self.ssd.read_scatter(items)

    def _bounced(self, to_ssd: bool, pool: torch.Tensor, mem: np.ndarray, ssd: np.ndarray) -> int:
        """The bounce-buffer path of _ssd_io; `ssd` is sorted."""
        bb = self.block_bytes
        if self._bounce is None:
            half = max(1, BOUNCE_BYTES // 2 // bb)
            self._bounce = HostRegion(2 * half * bb, locked_bytes=2 * half * bb)
            self._bounce_blocks = half
            self._bounce_io = ThreadPoolExecutor(max_workers=1, thread_name_prefix="agentcg-kv-bounce")
        half, bounce = self._bounce_blocks, self._bounce
        rows_all = bounce.tensor[: 2 * half * bb].view(2 * half, bb)
        ios = 0
        pending: Future | None = None
        previous: tuple[np.ndarray, np.ndarray] | None = None   # reads: (bounce rows, memory slots) to scatter

        def piece_io(rows: np.ndarray, file_slots: np.ndarray) -> int:
            items: list[tuple[int, list[memoryview]]] = []
            for s, r, k in block_runs(file_slots, rows):
                items.append((s, [bounce.view(r * bb, k * bb)]))
            return self.ssd.write_gather(items) if to_ssd else self.ssd.read_scatter(items)

        for i, start in enumerate(range(0, len(mem), half)):
            m, f = mem[start:start + half], ssd[start:start + half]
            rows = np.arange(len(m), dtype=np.int64) + (i % 2) * half
            if to_ssd:
                indexed_copy(rows_all, rows, pool, m)   # the other half may still be writing
                if pending is not None:
                    ios += pending.result()
                pending = self._bounce_io.submit(piece_io, rows, f)
            else:
                future = self._bounce_io.submit(piece_io, rows, f)
                if previous is not None:
                    indexed_copy(pool, previous[1], rows_all, previous[0])
                ios += future.result()
                previous = (rows, m)
        if pending is not None:
            ios += pending.result()
        if previous is not None:
            indexed_copy(pool, previous[1], rows_all, previous[0])
        return ios

    def _staged(self, to_ssd: bool, mem_slots: np.ndarray, ssd_slots: np.ndarray, ready: object) -> int:
        """Device <-> SSD through the bounded staging buffer, a staging-full at a time:
        scattered device blocks are gathered into it (or scattered from it) in one copy."""
        cap, ios = self._staging_blocks, 0
        staging = self._staging.tensor[: cap * self.block_bytes].view(cap, self.block_bytes)
        pool = self.device.pool
        for done in range(0, len(mem_slots), cap):
            mem, ssd = mem_slots[done:done + cap], ssd_slots[done:done + cap]
            rows = np.arange(len(mem), dtype=np.int64)
            if to_ssd:
                self.device.copy_blocks(staging, rows, pool, mem, after=ready)
                ios += self._ssd_io(True, self._staging, rows, ssd)
            else:
                ios += self._ssd_io(False, self._staging, rows, ssd)
                self.device.copy_blocks(pool, mem, staging, rows)
        return ios
