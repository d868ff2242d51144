"""Shared fixtures for the whole suite.

`cgroup_tree`: a real CgroupTree of this host's layout (v2 or hybrid) rooted at
`agentcg-test-<random>`; removed at teardown even when the test fails, and the teardown
asserts that no directory of it is left in any hierarchy.

`fixture_v2_tree`: a V2Tree over a temporary copy of tests/fixtures/cgroup2, a tree in
real cgroup v2 file formats. It is a FIXTURE, not a kernel: use it for what this host's
v2 tree cannot provide (memory/cpu/pids controllers on a hybrid host); writes land in
plain files and nothing can be spawned, frozen or killed in it.
"""
from __future__ import annotations

import secrets
import shutil
from pathlib import Path
from typing import Iterator

import pytest

FIXTURE_CGROUP2 = Path(__file__).parent / "fixtures" / "cgroup2"


@pytest.fixture
def cgroup_tree() -> Iterator["CgroupTree"]:  # noqa: F821
    from agentcg.controller.cgroup import open_tree
    from agentcg.errors import AgentcgError

    try:
        tree = open_tree(root=f"agentcg-test-{secrets.token_hex(4)}")
    except AgentcgError as exc:
        pytest.skip(f"no usable cgroup tree on this host: {exc}")
    try:
        yield tree
    finally:
        if tree.exists(""):
            tree.remove("", timeout_s=10.0)
        left = [str(base) for base in tree._hierarchy_bases() if base.exists()]
        assert not left, f"cgroup_tree teardown left {left}"


@pytest.fixture
def fixture_v2_tree(tmp_path: Path) -> "V2Tree":  # noqa: F821
    from agentcg.controller.cgroup.v2 import V2Tree

    mount = tmp_path / "cgroup2"
    shutil.copytree(FIXTURE_CGROUP2, mount)
    return V2Tree(mount, "agentcg", kernel_release="6.8.0")


def _loaded_monitor(concerns: tuple[str, ...] | None) -> Iterator:
    """A real BpfMonitor (one compile, about 0.4 s, per test module), closed afterwards."""
    import os

    if os.geteuid() != 0:
        pytest.skip("loading BPF programs needs root")
    try:
        import bcc  # noqa: F401
    except ImportError:
        pytest.skip("bcc is not installed (Debian package python3-bpfcc)")
    from agentcg.bpf.monitor import BpfMonitor

    mon = BpfMonitor() if concerns is None else BpfMonitor(concerns=concerns)
    try:
        yield mon
    finally:
        mon.close()


@pytest.fixture(scope="module")
def monitor() -> Iterator:
    yield from _loaded_monitor(None)


@pytest.fixture(scope="module")
def monitor_with_faults() -> Iterator:
    """The default concerns plus faults (RSS from every page fault: opt-in)."""
    from agentcg.bpf.monitor import CONCERNS

    yield from _loaded_monitor(CONCERNS + ("faults",))


@pytest.fixture(scope="module")
def monitor_with_exit_codes() -> Iterator:
    """The default concerns plus exit_codes (it hooks a syscall tracepoint: opt-in)."""
    from agentcg.bpf.monitor import CONCERNS

    yield from _loaded_monitor(CONCERNS + ("exit_codes",))

