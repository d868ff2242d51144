"""The connector's worker-side data path, without vLLM: real CPU tensors laid out as vLLM's
CPU backend lays out its KV cache ([num_blocks, kv_heads, block_size, 2 x head_dim]) and as
its CUDA backends do ([2, num_blocks, block_size, kv_heads, head_dim]), and a real store."""
from __future__ import annotations

import pytest
import torch

from agentcg.gpu.vllm.datapath import (
    DataPath, LayoutError, LoadJob, MoveJob, SaveJob, geometry_of, open_store,
)

BLOCKS, HEADS, T, D, LAYERS = 16, 2, 32, 64, 2


def caches(layout: str) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    shape = (BLOCKS, HEADS, T, 2 * D) if layout == "cpu" else (2, BLOCKS, T, HEADS, D)
    return {f"model.layers.{i}.self_attn.attn": torch.randn(shape, generator=g) for i in range(LAYERS)}


def block(kv: dict[str, torch.Tensor], layout: str, b: int) -> list[torch.Tensor]:
    dim = 0 if layout == "cpu" else 1
    return [t.select(dim, b).clone() for t in kv.values()]


def path(kv, tmp_path, host_blocks=8, ssd_blocks=8, fault_file=None):
    geometry, names, dims = geometry_of(kv, BLOCKS, T, HEADS, D)
    store = open_store(geometry, staging_blocks=8, host_bytes=host_blocks * geometry.block_bytes,
                       ssd_dir=str(tmp_path / "ssd"), ssd_bytes=ssd_blocks * geometry.block_bytes, device="cpu")
    return DataPath(store, kv, names, dims, fault_file=fault_file)


@pytest.mark.parametrize("layout", ["cpu", "cuda"])
@pytest.mark.parametrize("tier", ["host", "ssd"])
def test_saved_blocks_load_back_bit_for_bit_into_other_blocks(tmp_path, layout, tier):
    kv = caches(layout)
    dp = path(kv, tmp_path)
    try:
        originals = [block(kv, layout, b) for b in (3, 7, 9)]
        saved = dp.save(SaveJob(1, "vllm:s", (3, 7, 9), tier))
        assert saved.ok and saved.blocks == 3, saved.reason
        assert {(s, d) for s, d, _, _ in saved.legs} >= {("gpu", "gpu"), ("device", tier)}
        assert all(n > 0 and t >= 0 for _, _, n, t in saved.legs)
        for t in kv.values():                      # the blocks are reused by vLLM for other data
            t.zero_()
        loaded = dp.load(LoadJob(2, "vllm:s", 0, (10, 11, 12)))
        assert loaded.ok and not loaded.failed_block_ids, loaded.reason
        for want, b in zip(originals, (10, 11, 12)):
            for w, got in zip(want, block(kv, layout, b)):
                assert torch.equal(w, got)
        assert dp.store.usage().requests == 0      # the copy is dropped once it is back
    finally:
        dp.store.close()


def test_a_load_from_the_middle_of_the_copy(tmp_path):
    kv = caches("cpu")
    dp = path(kv, tmp_path)
    try:
        want = block(kv, "cpu", 5)
        assert dp.save(SaveJob(1, "k", (4, 5, 6), "host")).ok
        assert dp.load(LoadJob(2, "k", 1, (13,))).ok             # store block 1 = vLLM block 5
        assert all(torch.equal(w, g) for w, g in zip(want, block(kv, "cpu", 13)))
    finally:
        dp.store.close()


def test_a_load_failing_half_way_reports_the_blocks_vllm_must_recompute(tmp_path):
    kv = caches("cpu")
    fault = tmp_path / "fault"
    dp = path(kv, tmp_path, fault_file=str(fault))
    try:
        first = block(kv, "cpu", 0)
        assert dp.save(SaveJob(1, "k", (0, 1, 2, 3), "host")).ok
        fault.write_text("load_half")
        r = dp.load(LoadJob(2, "k", 0, (8, 9, 10, 11)))
        assert not r.ok and "fault injected" in r.reason
        assert r.failed_block_ids == (10, 11)                     # 8 and 9 hold the right KV
        assert all(torch.equal(w, g) for w, g in zip(first, block(kv, "cpu", 8)))
    finally:
        dp.store.close()


def test_missing_or_short_copies_fail_every_block(tmp_path):
    kv = caches("cpu")
    dp = path(kv, tmp_path)
    try:
        r = dp.load(LoadJob(1, "never-saved", 0, (1, 2)))
        assert not r.ok and r.failed_block_ids == (1, 2)
        assert dp.save(SaveJob(2, "k", (1,), "host")).ok
        r = dp.load(LoadJob(3, "k", 0, (4, 5)))                  # the copy has 1 block, 2 wanted
        assert not r.ok and r.failed_block_ids == (4, 5) and "holds 1 blocks" in r.reason
    finally:
        dp.store.close()


def test_a_full_tier_refuses_the_save_and_keeps_nothing(tmp_path):
    kv = caches("cpu")
    dp = path(kv, tmp_path, host_blocks=2, ssd_blocks=0)
    try:
        r = dp.save(SaveJob(1, "k", (1, 2, 3), "host"))
        assert not r.ok and "host tier full" in r.reason
        assert dp.store.usage().requests == 0 and dp.store.usage().device.used_blocks == 0
    finally:
        dp.store.close()


def test_offload_and_discard_moves(tmp_path):
    kv = caches("cpu")
    dp = path(kv, tmp_path)
    try:
        want = block(kv, "cpu", 2)
        assert dp.save(SaveJob(1, "k", (2,), "host")).ok
        moved = dp.move(MoveJob(2, "k", "offload"))
        assert moved.ok and moved.legs and moved.legs[0][:2] == ("host", "ssd")
        assert dp.store.placement("k").ssd_blocks == 1
        assert dp.load(LoadJob(3, "k", 0, (15,), drop_after=False)).ok
        assert all(torch.equal(w, g) for w, g in zip(want, block(kv, "cpu", 15)))
        assert dp.move(MoveJob(4, "k", "discard")).ok
        assert not dp.move(MoveJob(5, "k", "discard")).ok          # nothing left to discard
    finally:
        dp.store.close()


def test_layouts_it_cannot_copy_are_refused_with_the_reason():
    with pytest.raises(LayoutError, match="no single dimension"):
        geometry_of({"l0": torch.zeros(3, 4)}, BLOCKS, T, HEADS, D)
    with pytest.raises(LayoutError, match="elements"):
        geometry_of({"l0": torch.zeros(BLOCKS, HEADS, T, D)}, BLOCKS, T, HEADS, D)
    with pytest.raises(LayoutError, match="no KV cache"):
        geometry_of({}, BLOCKS, T, HEADS, D)
