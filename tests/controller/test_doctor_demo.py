"""`agentcg demo`'s cgroup part on the real kernel, below an `agentcg-test-` root."""
from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from agentcg.demo import run_in_cgroup

ALLOC_BYTES = 64 << 20


@pytest.fixture
def test_root():
    cgroup = pytest.importorskip("agentcg.controller.cgroup")
    if not hasattr(cgroup, "open_tree"):
        pytest.skip("the cgroup layer (agentcg.controller.cgroup.open_tree) has not landed yet")
    root = f"agentcg-test-demo-{uuid.uuid4().hex[:8]}"
    try:
        tree = cgroup.open_tree(root=root)
    except ImportError as exc:
        pytest.skip(f"the cgroup layer is not complete yet: {exc}")
    try:
        yield root
    finally:
        if tree.exists(""):
            tree.remove("")
        assert not list(Path("/sys/fs/cgroup").glob(f"*/{root}")) + list(Path("/sys/fs/cgroup").glob(root))


def test_demo_measures_the_allocation_and_removes_its_cgroup(test_root):
    result = run_in_cgroup(ALLOC_BYTES, root=test_root)
    assert result.exit_code == 0
    # the cgroup was charged at least the touched pages, and not wildly more
    assert ALLOC_BYTES <= result.peak_memory_bytes < ALLOC_BYTES + (256 << 20)
    assert result.cpu_s > 0
    assert not list(Path("/sys/fs/cgroup").glob(f"*/{test_root}")) + list(Path("/sys/fs/cgroup").glob(test_root))
