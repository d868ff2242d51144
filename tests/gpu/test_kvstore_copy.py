"""The KV store's host block copies and numpy-built iovec I/O, on real memory and a real file
(O_DIRECT where the repository's filesystem takes it)."""
from __future__ import annotations

import os
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

from agentcg.errors import InvalidInput
from agentcg.gpu.hostmem import HostRegion
from agentcg.gpu.kvstore_copy import host_block_copy
from agentcg.gpu.kvstore_iov import IOV_MAX, MAX_IO_BYTES, PIECE_BYTES, plan_ios, run_arrays, run_ios

REPO = Path(__file__).resolve().parents[2]
BLOCK = 16 * 1024


def pools(n_src: int, n_dst: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(n_src)
    return (torch.randint(0, 256, (n_src, BLOCK), dtype=torch.uint8, generator=g),
            torch.zeros((n_dst, BLOCK), dtype=torch.uint8))


@pytest.mark.parametrize("case", ["gather", "scatter", "both scattered", "contiguous"])
def test_host_block_copy_moves_each_block_to_its_slot(case):
    rng = np.random.default_rng(1)
    n = 2500                                    # more than one 1,024-row piece when both are scattered
    src, dst = pools(3 * n, 3 * n)
    scattered = lambda: np.sort(rng.permutation(3 * n)[:n])[rng.permutation(n)]   # noqa: E731
    run = lambda: np.arange(n) + 7              # noqa: E731
    src_slots = run() if case in ("scatter", "contiguous") else scattered()
    dst_slots = run() if case in ("gather", "contiguous") else scattered()
    copies = host_block_copy(dst, dst_slots, src, src_slots)
    assert bool((dst.numpy()[dst_slots] == src.numpy()[src_slots]).all())
    untouched = np.setdiff1d(np.arange(3 * n), dst_slots)
    assert not dst.numpy()[untouched].any()
    assert copies == (3 if case == "both scattered" else 1)


def test_host_block_copy_refuses_bad_slots():
    src, dst = pools(4, 4)
    with pytest.raises(InvalidInput, match="slots"):
        host_block_copy(dst, np.array([0, 1]), src, np.array([2, 9]))
    with pytest.raises(InvalidInput, match="slots"):
        host_block_copy(dst, np.array([3, 1]), src, np.array([0]))
    with pytest.raises(InvalidInput, match="uint8 pool"):
        host_block_copy(dst.view(torch.int16), np.array([0]), src.view(torch.int16), np.array([0]))


def test_plan_keeps_every_io_within_its_limits():
    rng = np.random.default_rng(0)
    lengths = rng.choice([4096, BLOCK, 3 * 2**20, 65536], size=4000)
    offsets = np.concatenate(([0], np.cumsum(lengths)[:-1])) + np.cumsum(rng.random(4000) < 0.05) * 7 * 4096
    addresses = rng.integers(1, 2**30, 4000).astype(np.uint64) * 4096
    plan = plan_ios(offsets[::-1].copy(), addresses[::-1].copy(), lengths[::-1].copy())
    assert int(plan.sizes.sum()) == int(lengths.sum())
    assert (plan.sizes <= MAX_IO_BYTES).all() and (np.diff(plan.starts) <= IOV_MAX).all()
    assert (plan.iov[:, 1] <= PIECE_BYTES).all()
    for i in range(plan.n_ios):                 # each I/O: consecutive file bytes
        assert int(plan.iov[plan.starts[i]:plan.starts[i + 1], 1].sum()) == plan.sizes[i]
    uniform = plan_ios(np.arange(4096) * BLOCK, np.arange(4096, dtype=np.uint64) * 2 * BLOCK, np.full(4096, BLOCK))
    assert list(uniform.sizes) == [MAX_IO_BYTES] * 4 and list(np.diff(uniform.starts)) == [IOV_MAX] * 4


def test_run_arrays_matches_consecutive_runs():
    s, d, k = run_arrays(np.array([3, 4, 5, 9, 10, 2]), np.array([0, 1, 2, 3, 4, 8]))
    assert (list(s), list(d), list(k)) == ([3, 9, 2], [0, 3, 8], [3, 2, 1])


def test_iovec_io_round_trips_through_a_real_file():
    n = 3000                                    # 16 KiB blocks in shuffled file order: 3 I/Os
    region, back = HostRegion(n * BLOCK), HostRegion(n * BLOCK)
    data = np.random.default_rng(2).integers(0, 256, n * BLOCK, dtype=np.uint8)
    region.tensor.numpy()[:] = data
    order = np.random.default_rng(3).permutation(n)
    with tempfile.TemporaryDirectory(prefix="agentcg-test-iov-", dir=REPO) as d:
        fd = os.open(Path(d) / "blocks", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            try:
                os.close(fd)
                fd = os.open(Path(d) / "blocks", os.O_RDWR | os.O_DIRECT)
            except OSError:
                fd = os.open(Path(d) / "blocks", os.O_RDWR)
            os.posix_fallocate(fd, 0, n * BLOCK)
            with ThreadPoolExecutor(4) as pool:
                blocks = np.arange(n, dtype=np.uint64) * BLOCK
                ios = run_ios(fd, plan_ios(order * BLOCK, region.address + blocks, np.full(n, BLOCK)),
                              write=True, pool=pool)
                assert ios == 3
                run_ios(fd, plan_ios(order * BLOCK, back.address + blocks, np.full(n, BLOCK)), write=False, pool=pool)
            assert bool((back.tensor.numpy()[: n * BLOCK] == data).all())
            file_block = np.empty(BLOCK, dtype=np.uint8)
            os.preadv(fd, [region.view(0, BLOCK)], int(order[5]) * BLOCK)   # block 5 sits at its slot
            file_block[:] = region.tensor.numpy()[:BLOCK]
            assert bool((file_block == data[5 * BLOCK:6 * BLOCK]).all())
        finally:
            os.close(fd)
    region.close()
    back.close()
