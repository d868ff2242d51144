"""The daemon's incremental snapshot (controller/core/snapshot.py Views, Inputs.call_groups)
and call index (controller/daemon/call_index.py): what makes a tick and a `toolcall.begin`
cost the same with 10 or 10,000 calls must give what the full computation gives.

The snapshot test runs on the v2 FIXTURE tree (plain files: a call's memory.current is
rewritten by the test), since the point is which readings and views are reused, not what
the kernel counts; the index test runs real call cgroups."""
from __future__ import annotations

import dataclasses
from pathlib import Path

from agentcg.controller.core.snapshot import CallInput, Inputs, SandboxInput, Views, build_snapshot
from agentcg.controller.daemon.call_index import IndexedCalls
from agentcg.policies.sandbox import GraduatedPolicy

MiB = 1 << 20


def _without_age(snapshot):
    """The snapshot with every call's age_s zeroed: a reused view's age is as of the step that
    built it (documented in snapshot.Views; no policy reads it)."""
    return dataclasses.replace(snapshot, sandboxes=tuple(
        dataclasses.replace(sb, calls=tuple(dataclasses.replace(c, age_s=0.0) for c in sb.calls))
        for sb in snapshot.sandboxes))


class Calls:
    """Call cgroups in the fixture tree, and the two ways of passing them to build_snapshot."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.inputs: dict[str, dict[str, CallInput]] = {}          # sandbox -> call id -> input
        self.groups: dict[str, tuple[CallInput, ...]] = {}

    def add(self, sandbox: str, call_id: str, usage: int, tool: str = "tool") -> None:
        path = f"{sandbox}/tools/{call_id}"
        (self.root / path).mkdir(parents=True, exist_ok=True)
        self.set(path, usage)
        self.inputs.setdefault(sandbox, {})[call_id] = CallInput(sandbox, call_id, tool, path, 0.0, None)
        self.groups.pop(sandbox, None)

    def remove(self, sandbox: str, call_id: str) -> None:
        del self.inputs[sandbox][call_id]
        self.groups.pop(sandbox, None)

    def set(self, path: str, usage: int) -> None:
        (self.root / path / "memory.current").write_text(f"{usage}\n")
        (self.root / path / "memory.peak").write_text(f"{usage}\n")

    def grouped(self) -> dict[str, tuple[CallInput, ...]]:
        """Like DaemonControl.call_groups: an unchanged sandbox gets the same tuple again."""
        for sandbox, calls in self.inputs.items():
            if sandbox not in self.groups:
                self.groups[sandbox] = tuple(calls.values())
        return dict(self.groups)

    def flat(self) -> tuple[CallInput, ...]:
        return tuple(c for calls in self.inputs.values() for c in calls.values())


def test_an_incremental_snapshot_equals_the_full_one_after_changes(fixture_v2_tree):
    tree = fixture_v2_tree
    root = tree.root_dir
    sb1 = int((root / "sb1" / "memory.current").read_text())
    calls = Calls(root)
    for i in range(5):
        calls.add("sb1", f"c{i}", (i + 1) * MiB)
    calls.add("sb2", "d0", 3 * MiB)
    far = (SandboxInput("sb1", "sb1", budget_bytes=sb1 * 4), SandboxInput("sb2", "sb2"))
    near = (SandboxInput("sb1", "sb1", budget_bytes=sb1), SandboxInput("sb2", "sb2"))
    views, cache_incremental, cache_full = Views(), {}, {}
    peaks_incremental, peaks_full = {}, {}
    policy = GraduatedPolicy()
    state_incremental = state_full = policy.initial_state()

    def compare(sandboxes, now, **flags):
        nonlocal state_incremental, state_full
        common = dict(host_path=None, read_psi=False, near_budget=0.5)
        incremental, readings = build_snapshot(
            tree, Inputs(sandboxes, call_groups=calls.grouped(), **common), now, cache=cache_incremental,
            views=views, peaks=peaks_incremental, **flags)
        full, full_readings = build_snapshot(tree, Inputs(sandboxes, calls.flat(), **common), now,
                                             cache=cache_full, peaks=peaks_full, **flags)
        assert _without_age(incremental) == _without_age(full)
        assert dict(readings.call_bytes) == dict(full_readings.call_bytes)
        assert readings.sandbox_bytes == full_readings.sandbox_bytes
        actions_incremental, state_incremental = policy.decide(incremental, state_incremental)
        actions_full, state_full = policy.decide(full, state_full)
        assert actions_incremental == actions_full
        assert state_incremental == state_full
        return incremental

    compare(far, 1.0)
    built = views.built
    compare(far, 2.0)                                   # nothing changed: every group taken again
    assert views.built == built and views.reused >= 2
    calls.set("sb1/tools/c1", 50 * MiB)                 # cold: the last reading stands (both ways)
    calls.add("sb1", "c5", 7 * MiB)                     # a new call: only its view is built
    calls.remove("sb1", "c0")                           # an ended call: gone from the snapshot
    snap = compare(far, 3.0)
    assert [c.call_id for c in snap.sandboxes[0].calls] == ["c1", "c2", "c3", "c4", "c5"]
    assert snap.sandboxes[0].calls[0].usage_bytes == 2 * MiB
    assert ("sb1", "c0") not in views.calls
    calls.add("sb1", "c2", 3 * MiB, tool="pytest")      # its tool changed: a new CallInput, a new view
    snap = compare(far, 4.0)
    assert {c.call_id: c.tool for c in snap.sandboxes[0].calls}["c2"] == "pytest"
    snap = compare(near, 5.0)                           # hot: every call read again
    assert snap.sandboxes[0].calls[0].usage_bytes == 50 * MiB
    calls.set("sb1/tools/c3", 60 * MiB)
    compare(far, 6.0, frozen={("sb1", "c4")})           # a frozen call keeps its sandbox hot
    snap = compare(far, 7.0)                            # cold again: views from fresh readings
    assert {c.call_id: c.usage_bytes for c in snap.sandboxes[0].calls}["c3"] == 60 * MiB
    calls.remove("sb2", "d0")
    del calls.inputs["sb2"]                             # a sandbox whose calls all ended
    compare(far, 8.0)
    assert "sb2" not in views.groups and ("sb2", "d0") not in views.calls


def _brute_force(calls: IndexedCalls, sandboxes: list[str]) -> dict:
    running = calls.running()
    return {"count": len(running), "returned": sorted(c.call_id for c in running if c.has_returned),
            "running_in": {s: sum(1 for c in running if c.sandbox == s and not c.has_returned) for s in sandboxes},
            "of": {s: sorted(c.call_id for c in running if c.sandbox == s) for s in sandboxes},
            "cgroups": {c.cgroup_id: c.call_id for c in running}}


def _indexed(calls: IndexedCalls, sandboxes: list[str]) -> dict:
    table = calls._calls
    return {"count": calls.count(), "returned": sorted(c.call_id for c in calls.returned_calls()),
            "running_in": {s: calls.running_in(s) for s in sandboxes},
            "of": {s: sorted(c.call_id for c in calls.calls_of(s)) for s in sandboxes},
            "cgroups": {cgroup_id: calls.of_cgroup(cgroup_id).call_id for cgroup_id in table.by_cgroup}}


def test_the_call_index_answers_what_a_scan_of_every_call_does(cgroup_tree, tmp_path):
    calls = IndexedCalls(cgroup_tree, grace_s=0.0, state=tmp_path / "state")
    sandboxes = ["A", "B"]
    began = [calls.begin(s, "tool", "") for s in ("A", "A", "A", "B", "B")]
    assert _indexed(calls, sandboxes) == _brute_force(calls, sandboxes)
    assert calls.any_returned() is False
    versions = dict(calls.versions())
    calls.returned(began[0], 0)
    calls.returned(began[3], 1)
    assert _indexed(calls, sandboxes) == _brute_force(calls, sandboxes)
    assert calls.running_in("A") == 2 and calls.running_in("B") == 1 and calls.any_returned()
    assert calls.versions() == versions               # returning changes no snapshot input
    calls.resumed(began[0])                           # running again (an adopted `sandbox exec` command)
    assert _indexed(calls, sandboxes) == _brute_force(calls, sandboxes)
    records = calls.finish_due()                       # empty cgroups: the returned one is finished
    assert [r.call_id for r in records] == [began[3].call_id]
    assert _indexed(calls, sandboxes) == _brute_force(calls, sandboxes)
    assert calls.versions()["A"] == versions["A"] and calls.versions()["B"] != versions["B"]
    calls.changed(began[1])                           # a spare taken by a command
    assert calls.versions()["A"] != versions["A"]
    calls.discard(began[4])
    assert _indexed(calls, sandboxes) == _brute_force(calls, sandboxes)
    assert "B" not in calls.versions()
    assert calls.some([began[1].call_id, "gone", began[2].call_id]) == [began[1], began[2]]
    calls.close()
    assert _indexed(calls, sandboxes) == _brute_force(calls, sandboxes) and calls.count() == 0
