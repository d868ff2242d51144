"""V2Tree against tests/fixtures/cgroup2, a tree in real cgroup v2 file formats.

A mock of the kernel, used because this (hybrid) host's v2 tree has no memory, cpu or
pids controller: it checks parsing, the text written for each limit, and error mapping.
Spawn, freeze and kill are covered on the real kernel in test_cgroup_real.py."""
from __future__ import annotations

import os

import pytest

from agentcg.controller.cgroup import UNLIMITED, CpuStat, MemoryEvents, open_tree
from agentcg.controller.cgroup.layout import CgroupLayout
from agentcg.controller.cgroup.v2 import V2Tree
from agentcg.errors import CgroupExists, CgroupGone, ControllerMissing, InvalidInput

MiB = 1 << 20


def _read(tree, path, name):
    return (tree.cgroup_dir(path) / name).read_text().strip()


def test_capabilities_follow_the_parents_subtree_control(fixture_v2_tree):
    assert fixture_v2_tree.kind == "v2"
    assert {"memory.max", "memory.high", "memory.peak", "cpu.max", "pids.max", "freeze", "kill", "psi"} \
        <= fixture_v2_tree.capabilities


def test_memory_readings(fixture_v2_tree):
    assert fixture_v2_tree.memory_current("sb1") == 73129984
    assert fixture_v2_tree.memory_peak("sb1") == 268980224
    assert fixture_v2_tree.memory_events("sb1") == MemoryEvents(low=0, high=412, max=37, oom=2, oom_kill=2)
    stat = fixture_v2_tree.memory_stat("sb1")
    assert (stat.anon_bytes, stat.file_bytes, stat.kernel_bytes, stat.shmem_bytes) == \
        (52297728, 17301504, 3211264, 1048576)
    assert (stat.pgfault, stat.pgmajfault) == (1892334, 117)
    assert stat.fields["workingset_refault_file"] == 2210


def test_cpu_and_pressure_readings(fixture_v2_tree):
    assert fixture_v2_tree.cpu_stat("sb1") == CpuStat(8.412733, 6.120011, 2.292722, 1520, 312, 4.105542)
    pressure = fixture_v2_tree.pressure("sb1", "memory")
    assert pressure.some.avg10 == 12.51 and pressure.some.total_s == pytest.approx(3.412009)
    assert pressure.full.avg300 == 0.70 and pressure.full.total_s == pytest.approx(2.905112)
    with pytest.raises(InvalidInput, match="PSI resource"):
        fixture_v2_tree.pressure("sb1", "disk")


def test_identity_state_and_membership(fixture_v2_tree):
    assert fixture_v2_tree.children() == ["sb1", "sb2"]
    assert fixture_v2_tree.pids("sb1/tools/call-7") == [4242, 4250]
    assert fixture_v2_tree.is_populated("sb1") and fixture_v2_tree.is_frozen("sb1/tools/call-7")
    assert not fixture_v2_tree.is_frozen("sb1")
    assert fixture_v2_tree.cgroup_id("sb1") == os.stat(fixture_v2_tree.cgroup_dir("sb1")).st_ino


def test_limits_are_written_in_kernel_format(fixture_v2_tree):
    fixture_v2_tree.set_memory("sb1", high=256 * MiB, max=UNLIMITED, low=16 * MiB, min=0)
    assert _read(fixture_v2_tree, "sb1", "memory.high") == str(256 * MiB)
    assert _read(fixture_v2_tree, "sb1", "memory.max") == "max"
    assert _read(fixture_v2_tree, "sb1", "memory.low") == str(16 * MiB)
    fixture_v2_tree.set_cpu("sb1", weight=200, max_s=0.5, period_s=0.25)
    assert _read(fixture_v2_tree, "sb1", "cpu.weight") == "200"
    assert _read(fixture_v2_tree, "sb1", "cpu.max") == "500000 250000"
    fixture_v2_tree.set_cpu("sb1", max_s=UNLIMITED)
    assert _read(fixture_v2_tree, "sb1", "cpu.max") == "max 100000"
    fixture_v2_tree.set_pids_max("sb1", 64)
    assert _read(fixture_v2_tree, "sb1", "pids.max") == "64"


def test_missing_controller_and_vanished_cgroup_are_distinct(fixture_v2_tree):
    with pytest.raises(ControllerMissing, match="memory controller"):
        fixture_v2_tree.memory_current("sb2")
    with pytest.raises(ControllerMissing):
        fixture_v2_tree.set_memory("sb2", max=MiB)
    with pytest.raises(CgroupGone):
        fixture_v2_tree.memory_current("sb9")
    with pytest.raises(CgroupGone):
        fixture_v2_tree.pids("sb9")


def test_create_enables_controllers_and_refuses_duplicates(fixture_v2_tree):
    fixture_v2_tree.create("sb1/tools/call-8")  # parents already enable everything: nothing written
    assert _read(fixture_v2_tree, "sb1", "cgroup.subtree_control") == "cpu memory pids"
    fixture_v2_tree.create("sb2/call-1")
    assert fixture_v2_tree.exists("sb2/call-1")
    subtree = _read(fixture_v2_tree, "sb2", "cgroup.subtree_control")
    assert set(subtree.split()) == {"+memory", "+cpu", "+pids"}  # the text written; the kernel shows names
    with pytest.raises(CgroupExists):
        fixture_v2_tree.create("sb1")


def test_a_host_without_memory_controller_refuses_memory_limits(tmp_path):
    (tmp_path / "cgroup.subtree_control").write_text("cpu pids\n")
    tree = V2Tree(tmp_path, "agentcg", kernel_release="6.1.0")
    assert "memory.max" not in tree.capabilities and "cpu.max" in tree.capabilities
    with pytest.raises(ControllerMissing, match="memory.max"):
        tree.set_memory("x", max=MiB)


def test_open_tree_picks_the_implementation(tmp_path):
    layout = CgroupLayout(kind="v2", v2_mount=tmp_path, v2_controllers=frozenset())
    assert isinstance(open_tree("agentcg", layout), V2Tree)
    with pytest.raises(Exception, match="not supported"):
        open_tree("agentcg", CgroupLayout(kind="v1", v2_mount=None, v2_controllers=frozenset()))
