"""The spawn path without fork: the exec helper joins every hierarchy before the program
runs; real cgroups of this host's layout (cgroup_tree fixture), real processes."""
from __future__ import annotations

import subprocess

import pytest

from agentcg.controller.cgroup import spawner
from agentcg.errors import CgroupGone


def _placement(pid: int) -> str:
    return open(f"/proc/{pid}/cgroup").read()


@pytest.mark.parametrize("helper", ["built", "sh trampoline"])
def test_the_program_runs_inside_every_hierarchy(cgroup_tree, monkeypatch, helper):
    if helper == "built" and spawner.helper_path() is None:
        pytest.skip("the exec helper is not built (`bash scripts/host.sh setup` builds it; needs cc)")
    if helper != "built":
        monkeypatch.setattr(spawner, "helper_path", lambda: None)
    cgroup_tree.create("c1")
    proc = cgroup_tree.spawn("c1", ["/bin/sh", "-c", "cat /proc/self/cgroup"], stdout=subprocess.PIPE, text=True)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0 and proc.args == ["/bin/sh", "-c", "cat /proc/self/cgroup"]
    lines = out.splitlines()
    for directory in cgroup_tree._hierarchy_dirs("c1"):
        rel = "/" + "/".join(directory.parts[-2:])            # /<root>/c1
        assert any(line.endswith(rel) for line in lines), (rel, out)


def test_a_missing_program_raises_like_popen_and_leaves_nothing(cgroup_tree, tmp_path):
    cgroup_tree.create("c2")
    with pytest.raises(FileNotFoundError):
        cgroup_tree.spawn("c2", ["agentcg-no-such-program-xyz"])
    with pytest.raises(PermissionError):
        cgroup_tree.spawn("c2", ["/etc"])
    script = tmp_path / "no-interpreter"
    script.write_text("echo should not run\n")
    script.chmod(0o755)
    with pytest.raises(OSError, match="Exec format error"):   # execve, not execvp's sh retry
        cgroup_tree.spawn("c2", [str(script)])
    assert cgroup_tree.pids("c2") == []


def test_a_removed_cgroup_is_cgroup_gone_and_nothing_runs(cgroup_tree, tmp_path):
    cgroup_tree.create("c3")
    cgroup_tree.remove("c3")
    marker = tmp_path / "ran"
    with pytest.raises(CgroupGone):
        cgroup_tree.spawn("c3", ["/bin/sh", "-c", f"touch {marker}"])
    assert not marker.exists()
