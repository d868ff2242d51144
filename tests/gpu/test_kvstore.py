"""The tiered KV store on this host's real memory and filesystem (CPU device tier: no GPU here).

Every tier path round-trips random bit patterns and is compared by CRC; the SSD tier runs
with O_DIRECT on the repository's filesystem and buffered (fdatasync+fadvise) when forced.
"""
from __future__ import annotations

import threading
import zlib
from pathlib import Path

import pytest
import torch

from agentcg.errors import InvalidInput
from agentcg.gpu.kvgeometry import KVGeometry, KVStateError, KVTierFull
from agentcg.gpu.kvstore import TieredKVStore

REPO = Path(__file__).resolve().parents[2]
GEOMETRY = KVGeometry(layers=2, kv_heads=2, head_dim=64, dtype="bf16", tokens_per_block=16)  # 16 KiB blocks


@pytest.fixture
def ssd_dir(tmp_path_factory) -> Path:
    # On the repository's filesystem (ext4 here), where O_DIRECT works; /tmp may be tmpfs.
    import tempfile
    with tempfile.TemporaryDirectory(prefix="agentcg-test-kv-", dir=REPO) as d:
        yield Path(d)


def random_block(seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    bits = torch.randint(-2**15, 2**15, GEOMETRY.block_shape, dtype=torch.int16, generator=g)
    return bits.view(torch.bfloat16)  # every bit pattern, NaNs included: compare bytes, not values


def crc(block: torch.Tensor) -> int:
    return zlib.crc32(block.contiguous().view(torch.uint8).numpy().tobytes())


def fill(store: TieredKVStore, rid: str, n: int, seed: int = 0) -> list[int]:
    store.allocate(rid, n)
    sums = []
    for i in range(n):
        block = random_block(seed * 1000 + i)
        store.write(rid, i, block)
        sums.append(crc(block))
    return sums


def crcs(store: TieredKVStore, rid: str, n: int) -> list[int]:
    return [crc(store.read(rid, i)) for i in range(n)]


def test_geometry_sizes_and_validation():
    llama = KVGeometry(32, 8, 128, "bf16", 16)
    assert llama.bytes_per_token == 128 * 1024
    assert llama.block_bytes == 2 * 2**20
    assert GEOMETRY.block_shape == (2, 2, 16, 2, 64)
    with pytest.raises(InvalidInput, match="layers"):
        KVGeometry(0, 8, 128)
    with pytest.raises(InvalidInput, match="dtype"):
        KVGeometry(1, 1, 64, "int3")


@pytest.mark.parametrize("direct_io", [None, False], ids=["o_direct", "buffered"])
def test_every_path_round_trips_bit_exactly(ssd_dir, direct_io):
    with TieredKVStore(GEOMETRY, 16, 16, ssd_dir, 32, direct_io=direct_io) as store:
        assert store.ssd.io_mode == ("o_direct" if direct_io is None else "buffered+fdatasync+fadvise")
        want = fill(store, "r", 6, seed=1)
        store.swap_out("r").wait()                      # device -> host
        store.swap_in("r").wait()                       # host -> device
        assert crcs(store, "r", 6) == want
        store.offload("r").wait()                       # device -> ssd
        store.load("r").wait()                          # ssd -> device
        assert crcs(store, "r", 6) == want
        store.swap_out("r").wait()
        store.offload("r").wait()                       # host -> ssd
        store.load("r", via_host=True).wait()           # ssd -> host -> device
        assert crcs(store, "r", 6) == want
        store.swap_out("r").wait()
        store.load("r").wait()                          # host -> device through load()
        assert crcs(store, "r", 6) == want
        ops = [(r.op, r.src_tier, r.dst_tier) for r in store.records()]
        assert ops == [("swap_out", "device", "host"), ("swap_in", "host", "device"),
                       ("offload", "device", "ssd"), ("load", "ssd", "device"),
                       ("swap_out", "device", "host"), ("offload", "host", "ssd"),
                       ("load", "ssd", "host"), ("load", "host", "device"),
                       ("swap_out", "device", "host"), ("load", "host", "device")]
    assert list(ssd_dir.iterdir()) == []  # the tier file is gone


def test_records_add_up_to_bytes_moved(ssd_dir):
    with TieredKVStore(GEOMETRY, 16, 4, ssd_dir, 16, on_full="spill") as store:
        fill(store, "a", 10)
        records = store.swap_out("a").wait()          # 4 fit on the host, 6 spill to SSD
        assert [(r.dst_tier, r.blocks) for r in records] == [("host", 4), ("ssd", 6)]
        for r in records:
            assert r.bytes == r.blocks * GEOMETRY.block_bytes
            assert r.end_s >= r.start_s and r.bandwidth_bytes_per_s > 0
            assert r.copies == 1                       # contiguous slots: one copy / one I/O each
        assert sum(r.bytes for r in records) == 10 * GEOMETRY.block_bytes
        loaded = store.load("a").wait()
        assert sum(r.blocks for r in loaded) == 10
        assert store.records() == records + loaded
        assert "mlock" in records[0].path


def test_moves_chain_without_waiting(ssd_dir):
    with TieredKVStore(GEOMETRY, 8, 8, ssd_dir, 8) as store:
        want = fill(store, "r", 5, seed=2)
        store.swap_out("r")
        store.offload("r")
        last = store.load("r", via_host=True)
        assert crcs(store, "r", 5) == want             # read waits for the request's moves
        assert last.done()
        store.synchronize()
        assert store.usage().device.used_blocks == 5
        assert store.usage().host.used_blocks == 0 and store.usage().ssd.used_blocks == 0


def test_failed_move_gives_back_its_source_slots(ssd_dir, monkeypatch):
    """An SSD write error (injected: this host's disk does not fail on demand) fails the move;
    after discard every tier is as empty as before, so the failure does not shrink capacity."""
    with TieredKVStore(GEOMETRY, 4, 4, ssd_dir, 4) as store:
        fill(store, "r", 3, seed=4)
        store.swap_out("r").wait()
        store.allocate("r", 1)                          # one block on device, three on host

        def broken(slot, buffer):
            raise OSError(5, "Input/output error (injected)")

        monkeypatch.setattr(store.ssd, "write", broken)
        with pytest.raises(OSError, match="injected"):
            store.offload("r").wait()
        with pytest.raises(KVStateError, match="failed move"):
            store.swap_in("r")
        store.discard("r")
        usage = store.usage()
        assert (usage.device.used_blocks, usage.host.used_blocks, usage.ssd.used_blocks) == (0, 0, 0)
        monkeypatch.undo()
        want = fill(store, "s", 4, seed=5)              # the whole device tier is usable again
        store.offload("s").wait()
        store.load("s").wait()
        assert crcs(store, "s", 4) == want


def test_fragmented_slots_still_round_trip(ssd_dir):
    with TieredKVStore(GEOMETRY, 12, 12, ssd_dir, 12) as store:
        for i in range(6):
            fill(store, f"f{i}", 2, seed=10 + i)
        for i in (0, 2, 4):
            store.discard(f"f{i}")                     # holes of 2 slots
        want = fill(store, "big", 6, seed=3)           # lands in three separate runs
        records = store.swap_out("big").wait()
        assert records[0].copies == 3
        store.offload("big").wait()
        store.load("big").wait()
        assert crcs(store, "big", 6) == want


def test_full_tier_errors_without_changing_anything(ssd_dir):
    with TieredKVStore(GEOMETRY, 4, 2, ssd_dir, 3, on_full="error") as store:
        fill(store, "a", 4)
        before = store.usage()
        with pytest.raises(KVTierFull, match="allocate needs 1 free blocks in device but 0"):
            store.allocate("b", 1)
        with pytest.raises(KVTierFull, match="swap_out needs 4 free blocks in host but 2.*spill"):
            store.swap_out("a")
        with pytest.raises(KVTierFull, match="offload needs 4 free blocks in ssd but 3"):
            store.offload("a")
        assert store.usage() == before
        assert store.placement("a") == (4, 0, 0)
        assert store.records() == []


def test_spill_goes_down_and_nothing_is_dropped(ssd_dir):
    with TieredKVStore(GEOMETRY, 4, 2, ssd_dir, 6, on_full="spill") as store:
        want = fill(store, "a", 4, seed=4)
        assert store.allocate("b", 3) == (0, 2, 1)      # device full: host, then SSD
        store.swap_out("a").wait()                     # host full: all four to SSD
        assert store.placement("a") == (0, 0, 4)
        with pytest.raises(KVTierFull, match="allocate needs 10 free blocks in device..ssd but 5"):
            store.allocate("c", 10)                    # fits nowhere: refused, not truncated
        store.discard("b")
        store.load("a").wait()
        assert crcs(store, "a", 4) == want


def test_host_pool_resizes_and_keeps_data(ssd_dir):
    with TieredKVStore(GEOMETRY, 8, 4, ssd_dir, 8, host_max_blocks=8, on_full="error") as store:
        want_a = fill(store, "a", 4, seed=5)
        store.swap_out("a").wait()
        store.set_host_capacity(8)
        want_b = fill(store, "b", 3, seed=6)
        store.swap_out("b").wait()                     # host slots 4..6
        store.discard("a")                             # frees 0..3
        assert store.host.locked_bytes == 8 * GEOMETRY.block_bytes
        moved = store.set_host_capacity(4)             # b moves below the line
        assert [(r.op, r.src_tier, r.dst_tier, r.blocks) for r in moved] == [("host_shrink", "host", "host", 3)]
        assert store.usage().host == ("host", 4, 3, GEOMETRY.block_bytes)
        assert store.host.locked_bytes == 4 * GEOMETRY.block_bytes
        with pytest.raises(KVTierFull, match="leaves 1 blocks without a slot; offload some requests first"):
            store.set_host_capacity(2)                 # b holds slots 0..2: one has nowhere to go
        assert store.usage().host.capacity_blocks == 4
        store.load("b").wait()
        assert crcs(store, "b", 3) == want_b
        assert want_a  # a was discarded on purpose


def test_host_shrink_spills_to_ssd(ssd_dir):
    with TieredKVStore(GEOMETRY, 8, 6, ssd_dir, 8, on_full="spill") as store:
        want = fill(store, "a", 6, seed=8)
        store.swap_out("a").wait()
        records = store.set_host_capacity(2)
        assert sum(r.blocks for r in records if r.dst_tier == "ssd") == 4
        assert store.placement("a") == (0, 2, 4)
        store.load("a").wait()
        assert crcs(store, "a", 6) == want


def test_bad_use_is_refused_clearly(ssd_dir):
    with TieredKVStore(GEOMETRY, 4, 4, ssd_dir, 4) as store:
        with pytest.raises(KVStateError, match="unknown request 'nope'"):
            store.swap_out("nope")
        fill(store, "a", 2)
        with pytest.raises(InvalidInput, match="shape"):
            store.write("a", 0, torch.zeros(3, dtype=torch.bfloat16))
        with pytest.raises(KVStateError, match="no block 5"):
            store.read("a", 5)
        store.offload("a").wait()
        with pytest.raises(KVStateError, match="on the ssd tier; load or swap it in first"):
            store.read("a", 0)
    with pytest.raises(InvalidInput, match="on_full"):
        TieredKVStore(GEOMETRY, 1, 1, on_full="drop")
    with pytest.raises(InvalidInput, match="ssd_dir"):
        TieredKVStore(GEOMETRY, 1, 1, ssd_blocks=4)
    with TieredKVStore(GEOMETRY, 2, 2) as store:
        store.allocate("a", 1)
        with pytest.raises(KVStateError, match="needs an SSD tier"):
            store.offload("a")


def test_host_pool_is_locked_and_nothing_leaks(ssd_dir):
    def vm_locked_kib() -> int:
        status = Path("/proc/self/status").read_text()
        return int(status.split("VmLck:")[1].split()[0])

    threads_before = {t.name for t in threading.enumerate()}
    locked_before = vm_locked_kib()
    store = TieredKVStore(GEOMETRY, 64, 64, ssd_dir, 8)
    assert store.host.lock_method == "mlock"        # no CUDA: torch's pin_memory is unavailable
    assert vm_locked_kib() - locked_before >= 2 * 64 * GEOMETRY.block_bytes // 1024  # host + CPU device pool
    fill(store, "a", 2)
    store.swap_out("a").wait()
    assert any(t.name.startswith("agentcg-kv-transfer") for t in threading.enumerate())
    store.close()
    assert {t.name for t in threading.enumerate()} <= threads_before
    assert vm_locked_kib() == locked_before
    assert list(ssd_dir.iterdir()) == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU; this host has none")
def test_cuda_device_tier_round_trips(ssd_dir):
    with TieredKVStore(GEOMETRY, 8, 8, ssd_dir, 8, device="cuda") as store:
        assert store.device_kind == "cuda" and store.host.lock_method == "cudaHostRegister"
        want = fill(store, "r", 4, seed=9)
        store.swap_out("r").wait()
        store.swap_in("r").wait()
        store.offload("r").wait()                      # via the staging buffer
        store.load("r").wait()
        assert [crc(store.read("r", i).cpu()) for i in range(4)] == want


def _scatter(store: TieredKVStore, tier_blocks: int) -> None:
    """Leave every other device slot taken, as a paged engine's churn does."""
    for i in range(tier_blocks):
        store.allocate(f"filler-{i}", 1)
    for i in range(0, tier_blocks, 2):
        store.discard(f"filler-{i}")


@pytest.mark.parametrize("direct_io", [None, False])
def test_scattered_blocks_round_trip_every_tier(ssd_dir, direct_io):
    """Blocks on every other slot (more runs than the one-copy-per-run path takes) go through
    the indexed copies, the many-iovec I/Os and the I/Os in flight, and come back intact."""
    n = 40
    with TieredKVStore(GEOMETRY, 2 * n, 2 * n, ssd_dir, 2 * n, direct_io=direct_io) as store:
        _scatter(store, 2 * n)
        want = fill(store, "r", n, seed=9)
        assert len(set(int(s) for s in store._requests["r"].slot)) == n
        runs = store._requests["r"].slot
        assert (runs[1:] - runs[:-1] != 1).sum() > 8, "the request's device blocks are scattered"
        records = store.swap_out("r").wait()
        assert records[0].copies == 1                  # one gather, not one copy per block
        store.swap_in("r").wait()
        assert crcs(store, "r", n) == want
        store.offload("r").wait()
        store.load("r").wait()
        assert crcs(store, "r", n) == want
        store.swap_out("r").wait()
        store.offload("r").wait()                      # host -> SSD
        store.load("r", via_host=True).wait()
        assert crcs(store, "r", n) == want


def test_scattered_moves_of_many_ios_round_trip(ssd_dir):
    """More scattered blocks than one I/O takes (1,024 iovecs): several I/Os in flight, each
    built from numpy iovec arrays, and gathers/scatters over thousands of slots; bytes come
    back exactly, through every tier."""
    n = 1100
    with TieredKVStore(GEOMETRY, 2 * n, n, ssd_dir, n) as store:
        _scatter(store, 2 * n)
        store.allocate("r", n)
        slots = store._requests["r"].slot.copy()
        pattern = torch.randint(0, 256, (n, GEOMETRY.block_bytes), dtype=torch.uint8,
                                generator=torch.Generator().manual_seed(4))
        store.device.pool.numpy()[slots] = pattern.numpy()
        store.swap_out("r").wait()
        store.swap_in("r").wait()
        records = store.offload("r").wait()
        assert sum(r.copies for r in records) >= 2      # I/Os, each at most 1,024 iovecs
        store.load("r").wait()
        got = store.device.pool.numpy()[store._requests["r"].slot]
        assert bool((got == pattern.numpy()).all())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU; this host has none")
def test_cuda_scattered_blocks_round_trip(ssd_dir):
    """The CUDA tier's scattered paths: GPU index_select/index_copy_ on int64 rows, host
    gathers into pinned memory, device <-> SSD through the staging buffer."""
    n = 40
    with TieredKVStore(GEOMETRY, 2 * n, 2 * n, ssd_dir, 2 * n, device="cuda") as store:
        _scatter(store, 2 * n)
        want = fill(store, "r", n, seed=11)
        store.swap_out("r").wait()
        store.swap_in("r").wait()
        store.offload("r").wait()
        store.load("r").wait()
        store.swap_out("r").wait()
        store.offload("r").wait()
        store.load("r", via_host=True).wait()
        assert [crc(store.read("r", i).cpu()) for i in range(n)] == want
