"""Enforcer: policy actions become cgroup writes.

The memory.high path runs on `fixture_v2_tree` (a fixture in real v2 file formats: this
hybrid host's v2 tree has no memory controller, so memory.high cannot exist here). Freeze,
thaw, kill, limits and the cpu.max fallback run on the real kernel (`cgroup_tree`)."""
from __future__ import annotations

import sys

import pytest

from agentcg.controller.enforce import Enforcer, Layout
from agentcg.errors import InvalidInput
from agentcg.policies.sandbox import Action

MiB = 1 << 20
SLEEPER = [sys.executable, "-S", "-c", "import time; time.sleep(60)"]


def _read(tree, path, name, hierarchy="v2"):
    return (tree.cgroup_dir(path, hierarchy) / name).read_text().strip()


def _fixture_locate(sandbox, call_id):
    """The fixture's cgroup with every memory file (sb1) stands in for a tool call's."""
    return "sb1"


def test_v2_throttle_writes_memory_high_and_relax_resets_it(fixture_v2_tree):
    enforcer = Enforcer(fixture_v2_tree, locate=_fixture_locate)
    applied = enforcer.apply([Action("throttle", "sb", "c1", 300 * MiB, "test", cpu_max_cores=0.5)])
    assert applied[0].ok and not applied[0].degraded, applied[0].detail
    assert _read(fixture_v2_tree, "sb1", "memory.high") == str(300 * MiB)
    assert _read(fixture_v2_tree, "sb1", "cpu.max").split()[0] == "max"   # no CPU fallback on v2
    assert enforcer.apply_one(Action("relax", "sb", "c1", None, "test")).ok
    assert _read(fixture_v2_tree, "sb1", "memory.high") == "max"


def test_v2_protect_and_admit(fixture_v2_tree):
    enforcer = Enforcer(fixture_v2_tree)
    assert enforcer.apply_one(Action("protect", "sb1", None, 512 * MiB, "test", cpu_weight=400)).ok
    assert _read(fixture_v2_tree, "sb1", "memory.low") == str(512 * MiB)
    assert _read(fixture_v2_tree, "sb1", "cpu.weight") == "400"
    admit = Enforcer(fixture_v2_tree, locate=_fixture_locate).apply_one(Action("admit", "sb", "c1", 64 * MiB, "t"))
    assert admit.ok and not admit.degraded
    assert _read(fixture_v2_tree, "sb1", "memory.high") == str(64 * MiB)


def test_dry_run_writes_nothing(fixture_v2_tree):
    before = _read(fixture_v2_tree, "sb1", "memory.high")
    enforcer = Enforcer(fixture_v2_tree, dry_run=True, locate=_fixture_locate)
    for action in (Action("throttle", "sb", "c1", MiB, "test"), Action("kill", "sb", "c1", None, "test"),
                   Action("limit", "sb", None, MiB, "test")):
        applied = enforcer.apply_one(action)
        assert applied.ok and applied.dry_run and applied.detail.startswith("dry run: would")
    assert _read(fixture_v2_tree, "sb1", "memory.high") == before


def test_kill_without_a_call_is_refused(fixture_v2_tree):
    """The agent cgroup is never killed: the Action refuses, and so does the Enforcer."""
    with pytest.raises(InvalidInput):
        Action("kill", "sb1", None, None, "test")
    forged = Action("freeze", "sb1", "x", None, "test")
    object.__setattr__(forged, "kind", "kill")
    object.__setattr__(forged, "call_id", None)
    with pytest.raises(InvalidInput):
        Enforcer(fixture_v2_tree).apply_one(forged)


def _proc_state(pid):
    return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]


def test_real_freeze_thaw_kill_limit_and_latency(cgroup_tree):
    layout = Layout("r")
    cgroup_tree.create(layout.agent("sb"))
    cgroup_tree.create(layout.call("sb", "c1"))
    proc = cgroup_tree.spawn(layout.call("sb", "c1"), SLEEPER)
    enforcer = Enforcer(cgroup_tree, locate=layout.locate)
    try:
        frozen = enforcer.apply_one(Action("freeze", "sb", "c1", None, "test"))
        assert frozen.ok and frozen.latency_s > 0 and cgroup_tree.is_frozen(layout.call("sb", "c1"))
        assert enforcer.apply_one(Action("thaw", "sb", "c1", None, "test")).ok
        assert not cgroup_tree.is_frozen(layout.call("sb", "c1"))
        assert enforcer.apply_one(Action("limit", "sb", None, 256 * MiB, "test")).ok
        hierarchy = "v2" if cgroup_tree.kind == "v2" else "memory"
        name = "memory.max" if cgroup_tree.kind == "v2" else "memory.limit_in_bytes"
        assert _read(cgroup_tree, layout.sandbox("sb"), name, hierarchy) == str(256 * MiB)
        assert enforcer.apply_one(Action("kill", "sb", "c1", None, "test")).ok
        assert proc.wait(timeout=5) == -9
    finally:
        proc.kill()
        proc.wait()


def test_real_throttle_degrades_to_cpu_max_without_memory_high(cgroup_tree):
    if "memory.high" in cgroup_tree.capabilities:
        pytest.skip("this host has memory.high; the v1 fallback is not used (covered on the fixture tree)")
    if "cpu.max" not in cgroup_tree.capabilities:
        pytest.skip("no cpu.max either: throttle cannot act on this host")
    layout = Layout()
    cgroup_tree.create(layout.call("sb", "c1"))
    enforcer = Enforcer(cgroup_tree)
    applied = enforcer.apply_one(Action("throttle", "sb", "c1", 100 * MiB, "test", cpu_max_cores=0.2))
    assert applied.ok and applied.degraded and "memory.high unavailable" in applied.detail
    assert _read(cgroup_tree, "sb/tools/c1", "cpu.cfs_quota_us", "cpu") == "20000"
    assert enforcer.apply_one(Action("relax", "sb", "c1", None, "test")).ok
    assert _read(cgroup_tree, "sb/tools/c1", "cpu.cfs_quota_us", "cpu") == "-1"


def test_real_action_on_a_call_that_ended_is_recorded_not_raised(cgroup_tree):
    cgroup_tree.create("sb/tools")
    applied = Enforcer(cgroup_tree).apply_one(Action("freeze", "sb", "gone", None, "test"))
    assert not applied.ok and "gone" in applied.detail
