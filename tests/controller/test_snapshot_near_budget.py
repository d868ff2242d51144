"""Inputs.near_budget (controller/core/snapshot.py): the daemon reads a sandbox's calls only
near its budget. On the v2 FIXTURE tree (plain files: a call's memory.current is rewritten
by the test), since the point is which files are read, not what the kernel counts."""
from __future__ import annotations

import dataclasses

from agentcg.controller.core.snapshot import CallInput, Inputs, SandboxInput, build_snapshot


def test_a_cold_sandbox_keeps_its_calls_last_reading_a_hot_one_is_read(fixture_v2_tree):
    tree = fixture_v2_tree
    root = tree.root_dir
    sandbox_bytes = int((root / "sb1" / "memory.current").read_text())
    call_file = root / "sb2" / "memory.current"                 # stands in for a call's cgroup
    call_file.write_text("1048576\n")
    call = CallInput("sb1", "c1", "tool", "sb2", 0.0)
    far = Inputs((SandboxInput("sb1", "sb1", budget_bytes=sandbox_bytes * 4),), (call,), host_path=None,
                 read_psi=False, near_budget=0.5)
    cache: dict = {}
    first = build_snapshot(tree, far, 1.0, cache=cache)[0].sandboxes[0].calls[0].usage_bytes
    call_file.write_text(f"{first + 4096}\n")
    assert build_snapshot(tree, far, 2.0, cache=cache)[0].sandboxes[0].calls[0].usage_bytes == first
    near = dataclasses.replace(far, sandboxes=(SandboxInput("sb1", "sb1", budget_bytes=sandbox_bytes),))
    assert build_snapshot(tree, near, 3.0, cache=cache)[0].sandboxes[0].calls[0].usage_bytes == first + 4096
    # a frozen call's sandbox is read whatever its usage; and without a cache every call is read
    call_file.write_text(f"{first + 8192}\n")
    frozen = build_snapshot(tree, far, 4.0, cache=cache, frozen={("sb1", "c1")})[0]
    assert frozen.sandboxes[0].calls[0].usage_bytes == first + 8192
    call_file.write_text(f"{first}\n")
    assert build_snapshot(tree, far, 5.0)[0].sandboxes[0].calls[0].usage_bytes == first
