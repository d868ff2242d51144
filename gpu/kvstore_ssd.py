"""How the tiered KV store (kvstore.py) moves blocks to and from the SSD: one I/O per file
range with the memory runs as iovecs (for many runs built by numpy and issued through
ctypes, several in flight), and device blocks through the bounded staging buffer. A mixin
of `TieredKVStore`."""
from __future__ import annotations

import numpy as np

from agentcg.gpu.device_tier import FEW_RUNS, block_runs
from agentcg.gpu.hostmem import HostRegion
from agentcg.gpu.kvstore_iov import plan_ios, run_arrays


class SsdCopies:
    """Mixin of `TieredKVStore`: blocks between memory (host, device or staging) and the SSD."""

    def _ssd_io(self, to_ssd: bool, region: HostRegion, mem_slots: np.ndarray, ssd_slots: np.ndarray) -> int:
        """Blocks between memory (`region`, slots of block_bytes) and the SSD file. Many
        runs (blocks scattered as a paged engine leaves them): straight from and into the
        blocks with no copy, each I/O consecutive file bytes whose iovecs are the memory
        runs, built by numpy and issued by ctypes, IO_DEPTH in flight (kvstore_iov.py).
        Measured on this host (16 KiB blocks on alternate slots, 256 MiB, paired with the
        fio-like ceiling, load 12): 0.62-0.74 of it this way; through a double-buffered bounce
        buffer (gather, then one plain I/O) 0.22-0.51, because the gather's memcpy and the
        virtual disk's own copy of the data compete for the same memory and cores.
        A few runs: one I/O per file range with the runs as memoryviews."""
        bb = self.block_bytes
        if len(ssd_slots) == 0:
            return 0
        order = np.argsort(ssd_slots, kind="stable")
        ssd, mem = ssd_slots[order], mem_slots[order]
        ssd_start, mem_start, count = run_arrays(ssd, mem)
        if len(count) > FEW_RUNS:
            plan = plan_ios(ssd_start * bb, region.address + mem_start.astype(np.uint64) * bb, count * bb)
            return self.ssd.run_plan(plan, write=to_ssd)
        runs = block_runs(ssd, mem)
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
