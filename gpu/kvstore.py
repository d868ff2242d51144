"""The tiered KV store an engine embeds: device pool, pinned host pool, SSD tier.

    store = TieredKVStore(KVGeometry(32, 8, 128, "bf16", 16), device_blocks=4096,
                          host_blocks=8192, ssd_dir="/var/tmp", ssd_blocks=65536, on_full="spill")
    store.allocate("req-1", 8)                 # blocks on the device
    store.write("req-1", 0, block)             # or store.block("req-1", 0) to fill in place
    store.swap_out("req-1").wait()             # device -> host (spills to SSD if host is full)
    store.offload("req-1").wait()              # device/host -> SSD
    store.load("req-1", via_host=False).wait() # SSD/host -> device
    store.discard("req-1")

Every move is planned on the caller's thread (destination slots reserved, the request's
placement updated at once) and carried out on one transfer thread in submission order, so
moves of the same request chain correctly without waiting. Runs of consecutive slots are
one copy or one I/O each; slots are handed out as contiguous runs whenever there is one.
Blocks scattered as a paged engine leaves them are gathered (or scattered) in one indexed
copy (kvstore_copy.py in host memory), and go to and from the SSD with no copy as iovecs
built by numpy, several I/Os in flight (docs/gpu.md, "Scattered blocks"; the SSD paths
are in kvstore_ssd.py and kvstore_iov.py, the free-slot bitmaps in kvstore_slots.py).
A source slot is freed only after its copy has landed. Each leg of a move yields a
TransferRecord. `on_full="error"` raises KVTierFull before anything moves; `"spill"` sends
what does not fit to the next tier down (device -> host -> SSD). Nothing is dropped: a move
that cannot be placed anywhere raises.
"""
from __future__ import annotations

import collections
import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from agentcg.errors import InvalidInput
from agentcg.gpu.device_tier import (
    FEW_RUNS, DeviceTier, block_runs, choose_device_tier, count_runs, indexed_copy,
)
from agentcg.gpu.hostmem import HostRegion
from agentcg.gpu.kvgeometry import (
    TIER_NAMES, KVGeometry, KVStateError, KVTierFull, Placement, StoreUsage, TierUsage, TransferRecord,
)
from agentcg.gpu.kvstore_copy import copy_run
from agentcg.gpu.kvstore_slots import _Slots
from agentcg.gpu.kvstore_ssd import SsdCopies
from agentcg.gpu.ssd_tier import SsdTier

DEVICE, HOST, SSD = 0, 1, 2
RECORDS_MAX = 65536
STAGING_BYTES = 32 * 2**20


_runs = block_runs   # kept for callers of the old private name


@dataclass
class _Leg:
    src: int
    dst: int
    src_slots: np.ndarray
    dst_slots: np.ndarray


@dataclass
class _Request:
    tier: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int8))
    slot: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int64))
    pending: list[Future] = field(default_factory=list)
    error: BaseException | None = None


class Transfer:
    """A submitted move; `wait()` returns its TransferRecords once every leg has landed."""

    def __init__(self, future: Future | None) -> None:
        self._future = future

    def done(self) -> bool:
        return self._future is None or self._future.done()

    def wait(self, timeout_s: float | None = None) -> list[TransferRecord]:
        return [] if self._future is None else self._future.result(timeout=timeout_s)


class TieredKVStore(SsdCopies):
    def __init__(self, geometry: KVGeometry, device_blocks: int, host_blocks: int,
                 ssd_dir: str | os.PathLike | None = None, ssd_blocks: int = 0,
                 on_full: str = "error", *, device: str = "auto", host_max_blocks: int | None = None,
                 direct_io: bool | None = None, staging_bytes: int = STAGING_BYTES,
                 on_record: Callable[[TransferRecord], None] | None = None) -> None:
        if on_full not in ("error", "spill"):
            raise InvalidInput(f"KV store: on_full must be 'error' or 'spill', got {on_full!r}")
        for name, value in (("device_blocks", device_blocks), ("host_blocks", host_blocks), ("ssd_blocks", ssd_blocks)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise InvalidInput(f"KV store: {name} must be a non-negative integer, got {value!r}")
        if ssd_blocks and ssd_dir is None:
            raise InvalidInput("KV store: ssd_blocks > 0 needs an ssd_dir")
        host_max_blocks = host_blocks if host_max_blocks is None else host_max_blocks
        if host_max_blocks < host_blocks:
            raise InvalidInput(f"KV store: host_max_blocks ({host_max_blocks}) < host_blocks ({host_blocks})")
        self.geometry = geometry
        self.block_bytes = bb = geometry.block_bytes
        self.on_full = on_full
        self._on_record = on_record
        self._lock = threading.RLock()
        self._requests: dict[str, _Request] = {}
        self._records: collections.deque[TransferRecord] = collections.deque(maxlen=RECORDS_MAX)
        self.records_dropped = 0
        self._executor: ThreadPoolExecutor | None = None
        self._inflight: set[Future] = set()
        self.device: DeviceTier | None = None
        self.host: HostRegion | None = None
        self.ssd: SsdTier | None = None
        self._staging: HostRegion | None = None
        try:
            self.device = choose_device_tier(device_blocks, bb, device)
            use_cuda = self.device.kind == "cuda"
            self.host = HostRegion(max(host_max_blocks * bb, 1), locked_bytes=host_blocks * bb, use_cuda=use_cuda)
            self.host_pool = self.host.tensor[: host_max_blocks * bb].view(host_max_blocks, bb)
            if ssd_blocks:
                self.ssd = SsdTier(ssd_dir, ssd_blocks, bb, direct_io=direct_io)  # type: ignore[arg-type]
            if not self.device.host_addressable and self.ssd is not None:
                self._staging_blocks = max(1, staging_bytes // bb)
                self._staging = HostRegion(self._staging_blocks * bb, locked_bytes=self._staging_blocks * bb,
                                           use_cuda=use_cuda)
        except BaseException:
            self.close()
            raise
        self._slots = [_Slots(device_blocks), _Slots(host_blocks, host_max_blocks), _Slots(ssd_blocks)]
        self.host_max_blocks = host_max_blocks

    # ---- placement -------------------------------------------------------------------

    def _get(self, request_id: str) -> _Request:
        try:
            return self._requests[request_id]
        except KeyError:
            raise KVStateError(f"KV store: unknown request {request_id!r}; allocate it first") from None

    def _room(self, tier: int, spill: bool) -> int:
        return sum(self._slots[t].n_free for t in range(tier, SSD + 1 if spill else tier + 1))

    def _need(self, wanted: int, tier: int, spill: bool, op: str) -> None:
        room = self._room(tier, spill)
        if room < wanted:
            where = f"{TIER_NAMES[tier]}..ssd" if spill and tier < SSD else TIER_NAMES[tier]
            hint = " (on_full='spill' would use the tiers below)" if not spill and tier < SSD and op != "load" else ""
            raise KVTierFull(f"KV store: {op} needs {wanted} free blocks in {where} but {room} are free{hint}; "
                             "swap out, offload or discard other requests first")

    def _take(self, wanted: int, tier: int, spill: bool) -> list[tuple[int, np.ndarray]]:
        """Slots for `wanted` blocks from `tier` down (room checked by _need before)."""
        taken = []
        for t in range(tier, SSD + 1 if spill else tier + 1):
            n = min(wanted, self._slots[t].n_free)
            if n:
                taken.append((t, self._slots[t].take(n)))
                wanted -= n
        return taken

    def _planned(self, plan: Callable[[], object]) -> object:
        """Run `plan` under the lock; when a tier is short while moves are in flight, wait for
        them (they free their source slots when they land) and plan once more."""
        try:
            with self._lock:
                return plan()
        except KVTierFull:
            if not any(not f.done() for f in list(self._inflight)):
                raise
        self.synchronize()
        with self._lock:
            return plan()

    def allocate(self, request_id: str, n_blocks: int) -> Placement:
        """Add n_blocks (uninitialised) to a request: on the device, or with on_full='spill'
        the ones that do not fit on the host and then the SSD."""
        if isinstance(n_blocks, bool) or not isinstance(n_blocks, int) or n_blocks < 0:
            raise InvalidInput(f"KV store: n_blocks must be a non-negative integer, got {n_blocks!r}")

        def plan() -> Placement:
            spill = self.on_full == "spill"
            self._need(n_blocks, DEVICE, spill, "allocate")
            req = self._requests.get(request_id) or _Request()
            for tier, slots in self._take(n_blocks, DEVICE, spill):
                req.tier = np.concatenate((req.tier, np.full(len(slots), tier, dtype=np.int8)))
                req.slot = np.concatenate((req.slot, slots))
            self._requests[request_id] = req
            return self._placement(req)

        return self._planned(plan)  # type: ignore[return-value]

    def _move(self, request_id: str, op: str, sources: tuple[int, ...], dst: int, *, spill: bool = False,
              via_host: bool = False, only: np.ndarray | None = None) -> Transfer:
        def plan() -> Transfer:
            req = self._get(request_id)
            if req.error is not None:
                raise KVStateError(f"KV store: request {request_id!r} lost its data in a failed move "
                                   f"({req.error}); discard it")
            moving = np.flatnonzero(np.isin(req.tier, sources))
            if only is not None:
                moving = np.intersect1d(moving, only)
            if moving.size == 0:
                return Transfer(None)
            from_ssd = moving[req.tier[moving] == SSD]
            if via_host:
                self._need(from_ssd.size, HOST, False, op)
            self._need(moving.size, dst, spill, op)
            legs: list[_Leg] = []
            if via_host and from_ssd.size:
                host_slots = self._slots[HOST].take(from_ssd.size)
                legs.append(_Leg(SSD, HOST, req.slot[from_ssd].copy(), host_slots))
                req.tier[from_ssd], req.slot[from_ssd] = HOST, host_slots
            offset = 0
            for tier, slots in self._take(moving.size, dst, spill):
                idx = moving[offset: offset + len(slots)]
                offset += len(slots)
                for src in (HOST,) if via_host else sources:
                    sel = req.tier[idx] == src
                    if sel.any():
                        legs.append(_Leg(src, tier, req.slot[idx][sel], slots[sel]))
                req.tier[idx], req.slot[idx] = tier, slots
            future = self._submit(request_id, op, legs, self.device.mark())
            req.pending = [f for f in req.pending if not f.done()] + [future]
            return Transfer(future)

        return self._planned(plan)  # type: ignore[return-value]

    def swap_out(self, request_id: str) -> Transfer:
        """Device blocks -> host pool (-> SSD for what does not fit, with on_full='spill')."""
        return self._move(request_id, "swap_out", (DEVICE,), HOST, spill=self.on_full == "spill")

    def swap_in(self, request_id: str) -> Transfer:
        """Host blocks -> device."""
        return self._move(request_id, "swap_in", (HOST,), DEVICE)

    def offload(self, request_id: str) -> Transfer:
        """Device and host blocks -> SSD."""
        if self.ssd is None:
            raise KVStateError("KV store: offload needs an SSD tier; create the store with ssd_dir and ssd_blocks")
        return self._move(request_id, "offload", (DEVICE, HOST), SSD)

    def load(self, request_id: str, via_host: bool = False) -> Transfer:
        """SSD and host blocks -> device, directly or with the SSD blocks staged in the host pool."""
        return self._move(request_id, "load", (SSD, HOST), DEVICE, via_host=via_host)

    def discard(self, request_id: str) -> None:
        """Free every block of the request (after its moves in flight have landed)."""
        with self._lock:
            req = self._get(request_id)
        for future in req.pending:
            future.exception()  # wait; a failed move's error is reported through its Transfer
        with self._lock:
            for tier in (DEVICE, HOST, SSD):
                self._slots[tier].give(req.slot[req.tier == tier])
            del self._requests[request_id]

    # ---- block access ----------------------------------------------------------------

    def block(self, request_id: str, index: int) -> torch.Tensor:
        """The device-pool view of one block, shaped geometry.block_shape (write into it in place)."""
        with self._lock:
            req = self._get(request_id)
            if not 0 <= index < len(req.tier):
                raise KVStateError(f"KV store: request {request_id!r} has {len(req.tier)} blocks, no block {index}")
            if req.tier[index] != DEVICE:
                raise KVStateError(f"KV store: block {index} of {request_id!r} is on the "
                                   f"{TIER_NAMES[req.tier[index]]} tier; load or swap it in first")
            pending, slot = list(req.pending), int(req.slot[index])
        for future in pending:
            future.result()
        return self.device.pool[slot].view(self.geometry.dtype).view(self.geometry.block_shape)

    def write(self, request_id: str, index: int, block: torch.Tensor) -> None:
        """Copy one block tensor (shape geometry.block_shape, geometry.dtype) into the device pool."""
        if tuple(block.shape) != self.geometry.block_shape or block.dtype != self.geometry.dtype:
            raise InvalidInput(f"KV store: a block must have shape {self.geometry.block_shape} and dtype "
                               f"{self.geometry.dtype}, got {tuple(block.shape)} {block.dtype}")
        self.block(request_id, index).copy_(block)

    def read(self, request_id: str, index: int) -> torch.Tensor:
        """A copy of one block, on the device tier's device."""
        return self.block(request_id, index).clone()

    # ---- the transfer thread ---------------------------------------------------------

    def _submit(self, request_id: str, op: str, legs: list[_Leg], ready: object) -> Future:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="agentcg-kv-transfer")
        future = self._executor.submit(self._job, request_id, op, legs, ready)
        self._inflight.add(future)
        future.add_done_callback(self._inflight.discard)
        return future

    def _job(self, request_id: str, op: str, legs: list[_Leg], ready: object) -> list[TransferRecord]:
        try:
            records = self._run(request_id, op, legs, ready)
        except BaseException as exc:
            with self._lock:
                # req.slot already names the destination slots (kept until discard: nothing
                # half-written is reused); the sources are named nowhere else, so free them here.
                for leg in legs:
                    self._slots[leg.src].give(leg.src_slots)
                req = self._requests.get(request_id)
                if req is not None:
                    req.error = exc
            raise
        # Bookkeeping before the future resolves, so usage() is exact once wait() returns.
        with self._lock:
            for leg in legs:
                self._slots[leg.src].give(leg.src_slots)
            self._keep(records)
        return records

    def _keep(self, records: list[TransferRecord]) -> None:
        for record in records:
            if len(self._records) == self._records.maxlen:
                self.records_dropped += 1
            self._records.append(record)
            if self._on_record is not None:
                self._on_record(record)

    def _run(self, request_id: str, op: str, legs: list[_Leg], ready: object) -> list[TransferRecord]:
        records = []
        for leg in legs:
            start = time.monotonic()
            copies, path = self._copy_leg(leg, ready)
            end = time.monotonic()
            n = len(leg.src_slots)
            records.append(TransferRecord(request_id, op, TIER_NAMES[leg.src], TIER_NAMES[leg.dst], n,
                                          n * self.block_bytes, start, end, copies, path))
        return records

    def _copy_leg(self, leg: _Leg, ready: object) -> tuple[int, str]:
        dev = self.device
        lock = f"host {self.host.lock_method}"
        if SSD not in (leg.src, leg.dst):
            pools = {DEVICE: dev.pool, HOST: self.host_pool}
            if leg.src == leg.dst == HOST:   # host pool compaction: sources above the new size, no overlap
                if count_runs(leg.src_slots, leg.dst_slots) > FEW_RUNS:
                    copies = indexed_copy(self.host_pool, leg.dst_slots, self.host_pool, leg.src_slots)
                else:
                    runs = block_runs(leg.src_slots, leg.dst_slots)
                    for s, d, k in runs:
                        copy_run(self.host_pool, d, self.host_pool, s, k)
                    copies = len(runs)
            else:
                copies = dev.copy_blocks(pools[leg.dst], leg.dst_slots, pools[leg.src], leg.src_slots, after=ready)
            return copies, f"{'cuda stream' if dev.kind == 'cuda' else 'cpu memcpy'}, {lock}"
        other = leg.src if leg.dst == SSD else leg.dst
        to_ssd = leg.dst == SSD
        mem_slots, ssd_slots = (leg.src_slots, leg.dst_slots) if to_ssd else (leg.dst_slots, leg.src_slots)
        if other == HOST or dev.host_addressable:
            region = self.host if other == HOST else dev.region  # type: ignore[attr-defined]
            ios = self._ssd_io(to_ssd, region, mem_slots, ssd_slots)
            return ios, self.ssd.io_mode + (f", {lock}" if other == HOST else "")
        return self._staged(to_ssd, mem_slots, ssd_slots, ready), f"{self.ssd.io_mode} via staging ({self._staging.lock_method})"

    # ---- the daemon's knob -----------------------------------------------------------

    def set_host_capacity(self, host_blocks: int) -> list[TransferRecord]:
        """Grow or shrink the locked host pool (0..host_max_blocks blocks), synchronously.

        Shrinking moves blocks above the new size into free slots below it; what does not
        fit goes to SSD with on_full='spill', else KVTierFull is raised and nothing changes."""
        if (isinstance(host_blocks, bool) or not isinstance(host_blocks, int)
                or not 0 <= host_blocks <= self.host_max_blocks):
            raise InvalidInput(f"KV store: host capacity must be 0..{self.host_max_blocks} blocks "
                               f"(host_max_blocks), got {host_blocks!r}")
        self.synchronize()
        slots = self._slots[HOST]
        with self._lock:
            old = slots.capacity
            if host_blocks >= old:
                self.host.lock(host_blocks * self.block_bytes)
                slots.free[old:host_blocks] = True
                slots.n_free += host_blocks - old
                slots.capacity = host_blocks
                return []
            above = {rid: np.flatnonzero((req.tier == HOST) & (req.slot >= host_blocks))
                     for rid, req in self._requests.items()}
            above = {rid: idx for rid, idx in above.items() if idx.size}
            n_above = sum(idx.size for idx in above.values())
            free_below = int(np.count_nonzero(slots.free[:host_blocks]))
            if n_above > free_below:
                if self.on_full == "error":
                    raise KVTierFull(
                        f"KV store: shrinking the host pool to {host_blocks} blocks leaves {n_above - free_below} "
                        "blocks without a slot; offload some requests first or use on_full='spill'")
                spilled = n_above - free_below
                self._need(spilled, SSD, False, "set_host_capacity")
            # From here on no slot at or above the new size is handed out.
            slots.capacity, slots.n_free = host_blocks, free_below
            compact: list[tuple[str, _Leg]] = []
            to_ssd: list[tuple[str, np.ndarray]] = []
            for rid, idx in above.items():
                req = self._requests[rid]
                n = min(idx.size, slots.n_free)
                if n:
                    new = slots.take(n)
                    compact.append((rid, _Leg(HOST, HOST, req.slot[idx[:n]].copy(), new)))
                    req.slot[idx[:n]] = new
                if n < idx.size:
                    to_ssd.append((rid, idx[n:]))
        records: list[TransferRecord] = []
        for rid, leg in compact:
            recs = self._run(rid, "host_shrink", [leg], None)
            with self._lock:
                self._keep(recs)
            records += recs
        for rid, idx in to_ssd:
            records += self._move(rid, "host_shrink", (HOST,), SSD, only=idx).wait()
        with self._lock:
            slots.free[host_blocks:old] = False
            self.host.lock(host_blocks * self.block_bytes)
            self.host.release_pages(host_blocks * self.block_bytes, (old - host_blocks) * self.block_bytes)
        return records

    # ---- state -----------------------------------------------------------------------

    def _placement(self, req: _Request) -> Placement:
        counts = np.bincount(req.tier, minlength=3)
        return Placement(int(counts[DEVICE]), int(counts[HOST]), int(counts[SSD]))

    def placement(self, request_id: str) -> Placement:
        with self._lock:
            return self._placement(self._get(request_id))

    def usage(self) -> StoreUsage:
        with self._lock:
            tiers = [TierUsage(TIER_NAMES[t], s.capacity, s.capacity - s.n_free, self.block_bytes)
                     for t, s in enumerate(self._slots)]
            return StoreUsage(*tiers, requests=len(self._requests),
                              transfers_in_flight=sum(not f.done() for f in list(self._inflight)))

    def records(self, clear: bool = False) -> list[TransferRecord]:
        with self._lock:
            out = list(self._records)
            if clear:
                self._records.clear()
            return out

    @property
    def device_kind(self) -> str:
        return self.device.kind

    def synchronize(self) -> None:
        """Wait for every move in flight (errors stay with their Transfer)."""
        for future in list(self._inflight):
            future.exception()

    def close(self) -> None:
        if self._executor is not None:
            self.synchronize()
            self._executor.shutdown(wait=True)
            self._executor = None
        for part in (self.ssd, self._staging, self.host, self.device):
            if part is not None:
                part.close()
        self.ssd = self._staging = self.host = self.device = None  # type: ignore[assignment]
        self.host_pool = None  # type: ignore[assignment]

    def __enter__(self) -> "TieredKVStore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
