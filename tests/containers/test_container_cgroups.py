"""Container cgroups with the systemd driver (Docker, Podman, Kubernetes) on cgroup v2.

This host is hybrid and runs Podman with the cgroupfs driver (tested live in
test_podman_live.py), so the pure-v2 systemd-driver layouts are checked against
tests/fixtures/cgroup2 (a FIXTURE in real v2 file formats, not a kernel: nothing moves,
spawns or freezes there) and a fake /proc in a temporary directory."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from agentcg.controller.cgroup.layout import CgroupLayout
from agentcg.controller.cgroup.v2 import V2Tree
from agentcg.controller.container import ns_pids
from agentcg.controller.container_cgroups import (
    CgroupKind, ContainerCgroup, ContainerHybridTree, ContainerV2Tree, cgroups_of_pid, check_cgroup_path,
    check_writable, classify, container_tree,
)
from agentcg.controller.container_nest import enable_controllers
from agentcg.controller.container_tree import MountedTree
from agentcg.controller.container_state import memory_limit
from agentcg.errors import CgroupGone, HostUnsupported, InvalidInput

FIXTURE = Path(__file__).parent.parent / "fixtures" / "cgroup2"
DOCKER = "3f1c2a9be0d44c7e9a55e1b7f0c3d2a1b4e6f8091a2b3c4d5e6f708192a3b4c5"
PODMAN = "9d8e7f6a5b4c3d2e1f0a9b8c7d6e5f4a3b2c1d0e9f8a7b6c5d4e3f2a1b0c9d8e"
CRI = "c0ffee00d15ea5e5c0ffee00d15ea5e5c0ffee00d15ea5e5c0ffee00d15ea5e5"
POD = "1b2c3d4e_5f60_4a7b_8c9d_0e1f2a3b4c5d"
SYSTEMD_PATHS = {  # runtime -> (path as in /proc/<pid>/cgroup, its init pid, memory.max as a budget)
    "docker": (f"/system.slice/docker-{DOCKER}.scope", 4101, 1 << 30),
    "podman": (f"/machine.slice/libpod-{PODMAN}.scope", 5200, None),
    "kubernetes": (f"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{POD}.slice/"
                   f"cri-containerd-{CRI}.scope", 6300, 512 << 20),
}


@pytest.fixture
def mount(tmp_path: Path) -> Path:
    target = tmp_path / "cgroup2"
    shutil.copytree(FIXTURE, target)
    return target


@pytest.fixture
def layout(mount: Path) -> CgroupLayout:
    return CgroupLayout(kind="v2", v2_mount=mount, v2_controllers=frozenset({"cpu", "memory", "pids", "io"}))


def fake_proc(tmp_path: Path, pid: int, cgroup_text: str, nspid: str | None = None) -> Path:
    proc = tmp_path / "proc"
    (proc / str(pid)).mkdir(parents=True, exist_ok=True)
    (proc / str(pid) / "cgroup").write_text(cgroup_text)
    status = f"Name:\tsh\nPid:\t{pid}\n" + (f"NSpid:\t{nspid}\n" if nspid else "")
    (proc / str(pid) / "status").write_text(status)
    return proc


@pytest.mark.parametrize("path, expected", [
    (f"system.slice/docker-{DOCKER}.scope", CgroupKind("docker", "systemd", DOCKER)),
    (f"docker/{DOCKER}", CgroupKind("docker", "cgroupfs", DOCKER)),
    (f"machine.slice/libpod-{PODMAN}.scope", CgroupKind("podman", "systemd", PODMAN)),
    (f"user.slice/user-1000.slice/user@1000.service/user.slice/libpod-{PODMAN}.scope",
     CgroupKind("podman", "systemd", PODMAN)),
    (f"libpod_parent/libpod-{PODMAN}", CgroupKind("podman", "cgroupfs", PODMAN)),
    (SYSTEMD_PATHS["kubernetes"][0], CgroupKind("kubernetes", "systemd", CRI)),
    (f"kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{POD}.slice",
     CgroupKind("kubernetes", "systemd", POD.replace("_", "-"))),
    (f"kubepods/burstable/pod1b2c3d4e-5f60-4a7b-8c9d-0e1f2a3b4c5d/{CRI}", CgroupKind("kubernetes", "cgroupfs", CRI)),
    ("system.slice/agent-runner.service", CgroupKind("systemd", "systemd", None)),
    ("some/where", CgroupKind("unknown", None, None)),
])
def test_classify_names_runtime_driver_and_id(path, expected):
    assert classify(path) == expected
    assert classify("/" + path) == expected


@pytest.mark.parametrize("runtime", sorted(SYSTEMD_PATHS))
def test_systemd_driver_container_found_from_its_init_and_nested_below(runtime, tmp_path, mount, layout):
    path, pid, budget = SYSTEMD_PATHS[runtime]
    proc = fake_proc(tmp_path, pid, f"0::{path}\n")
    cg = cgroups_of_pid(pid, layout, proc=proc)
    assert cg == ContainerCgroup(path.lstrip("/"), {})
    assert cg.kind.runtime == runtime and cg.kind.driver == "systemd"
    tree = container_tree(layout, cg, own_root="agentcg")
    assert isinstance(tree, ContainerV2Tree) and tree.root_dir == mount / path.lstrip("/")
    # the container's parent slice hands it memory, cpu and pids: its children can have them
    assert {"memory.max", "memory.high", "memory.peak", "cpu.weight", "pids.max", "freeze"} <= tree.capabilities
    assert tree.cgroup_dir("tools/tc-1") == mount / path.lstrip("/") / "tools" / "tc-1"
    assert tree.pids("") == sorted(int(x) for x in (tree.root_dir / "cgroup.procs").read_text().split())
    assert memory_limit(tree) == budget
    # v2's no-internal-process rule: controllers for agent/ and tools/ are enabled in the
    # container's own subtree_control (after its processes moved to agent/; a fixture does not move them)
    assert enable_controllers(tree) == ["memory", "cpu", "pids"]
    assert (tree.root_dir / "cgroup.subtree_control").read_text() == "+memory +cpu +pids"
    with pytest.raises(InvalidInput, match="never removes"):
        tree.remove("")


def test_mounted_tree_routes_an_adopted_sandbox_to_the_container(mount, layout):
    base = V2Tree(mount, "agentcg", kernel_release="6.8.0")
    tree = MountedTree(base)
    docker = container_tree(layout, ContainerCgroup(SYSTEMD_PATHS["docker"][0].lstrip("/")))
    tree.mount("D", docker)
    scope = mount / SYSTEMD_PATHS["docker"][0].lstrip("/")
    assert tree.children("") == ["D", "sb1", "sb2"] and tree.exists("D") and tree.exists("sb1")
    assert tree.cgroup_dir("D") == scope and tree.cgroup_dir("D/tools/tc-9") == scope / "tools" / "tc-9"
    assert tree.cgroup_dir("sb1/agent") == mount / "agentcg" / "sb1" / "agent"
    assert tree.memory_current("D") == 52428800 and tree.memory_current("sb1") == 73129984
    assert tree.pressure("D").some.total_s == pytest.approx(0.001204)
    assert tree.cgroup_id("D") == os.stat(scope).st_ino
    for refused in (tree.remove, tree.kill):
        with pytest.raises(InvalidInput, match="adopted container"):
            refused("D")
    with pytest.raises(InvalidInput, match="adopted already"):
        tree.mount("D", docker)
    tree.unmount("D")
    assert tree.children("") == ["sb1", "sb2"] and not tree.exists("D")


def test_bad_cgroup_paths_are_refused(mount):
    scope = SYSTEMD_PATHS["docker"][0].lstrip("/")
    assert check_cgroup_path(mount, scope) == mount / scope
    assert check_cgroup_path(mount, f"{mount}/{scope}") == mount / scope     # the full path works too
    (mount / "link.scope").symlink_to(mount / scope)
    (mount / "plain").mkdir()
    for bad, error, match in (
        ("link.scope", InvalidInput, "symlink"),
        ("../etc", InvalidInput, "'..'"),
        ("system.slice/../machine.slice", InvalidInput, "'..'"),
        ("system.slice//x", InvalidInput, "segment ''"),
        ("", InvalidInput, "must name a cgroup"),
        ("a" * 300, InvalidInput, "255"),
        ("agentcg/sb1", InvalidInput, "agentcg's own root"),
        ("plain", CgroupGone, "not a cgroup"),
        ("no/such.scope", CgroupGone, "not a cgroup"),
    ):
        with pytest.raises(error, match=match):
            check_cgroup_path(mount, bad, own_root="agentcg")


def test_processes_that_are_gone_or_in_another_cgroup_namespace_are_refused(tmp_path, layout):
    proc = fake_proc(tmp_path, 77, "0::/../../system.slice/docker-abc.scope\n")
    with pytest.raises(HostUnsupported, match="cgroup namespace"):
        cgroups_of_pid(77, layout, proc=proc)
    with pytest.raises(CgroupGone, match="does not exist"):
        cgroups_of_pid(78, layout, proc=proc)
    with pytest.raises(InvalidInput):
        cgroups_of_pid(0, layout, proc=proc)


def test_host_and_container_pids_come_from_nspid(tmp_path):
    proc = fake_proc(tmp_path, 4242, "0::/x\n", nspid="4242\t17")
    assert ns_pids(4242, proc=proc) == (4242, 17)
    fake_proc(tmp_path, 4243, "0::/x\n")          # a kernel before 4.1: no NSpid line
    assert ns_pids(4243, proc=proc) == (4243, None)
    assert ns_pids(4244, proc=proc) == (4244, None)


def test_hybrid_container_paths_may_differ_per_hierarchy(tmp_path, mount):
    """Hybrid hosts (docker on cgroup v1 + unified): each v1 hierarchy has its own path."""
    v1 = {}
    for controller, path in (("memory", "docker/abc"), ("cpu", "system.slice/docker-abc.scope"),
                             ("pids", "docker/abc")):
        directory = tmp_path / "v1" / controller / path
        directory.mkdir(parents=True)
        (directory / "cgroup.procs").write_text("4101\n")
        v1[controller] = path
    layout = CgroupLayout(kind="hybrid", v2_mount=mount, v2_controllers=frozenset(),
                          v1_mounts={c: tmp_path / "v1" / c for c in v1})
    cg = ContainerCgroup(SYSTEMD_PATHS["docker"][0].lstrip("/"), v1)
    tree = container_tree(layout, cg)
    assert isinstance(tree, ContainerHybridTree)
    assert tree.cgroup_dir("tools/t1", "memory") == tmp_path / "v1" / "memory" / "docker" / "abc" / "tools" / "t1"
    assert tree.cgroup_dir("agent", "cpu") == tmp_path / "v1" / "cpu" / "system.slice" / "docker-abc.scope" / "agent"
    assert enable_controllers(tree) == []      # the v2 tree has no controllers on a hybrid host


@pytest.mark.skipif(os.geteuid() != 0, reason="switching to another uid needs root")
def test_a_cgroup_agentcg_may_not_write_is_refused(mount):
    scope = mount / SYSTEMD_PATHS["podman"][0].lstrip("/")
    check_writable([scope])                     # root may
    code = ("import os, pathlib, sys\n"
            "from agentcg.controller.container_cgroups import check_writable\n"
            "from agentcg.errors import AccessDenied\n"
            "os.setgid(65534); os.setuid(65534)\n"
            f"try:\n    check_writable([pathlib.Path({str(scope)!r})])\n"
            "except AccessDenied as exc:\n    print(exc); sys.exit(3)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert done.returncode == 3 and "may not write" in done.stdout, (done.stdout, done.stderr)
