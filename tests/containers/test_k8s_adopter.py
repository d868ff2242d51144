"""`agentcg sandbox adopt-pods`: which pods it adopts, where their cgroups are, what it
asks the daemon. No cluster here: the pod list is a PodList as the API server returns it
(trimmed), the cgroups are the v2 fixture tree, and the daemon is a recording stand-in
(the daemon's own sandbox.adopt is tested live in test_podman_live.py)."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from agentcg.controller.container_k8s import find_container_cgroup, pods_to_adopt, reconcile, sandbox_name
from agentcg.errors import CgroupExists, CgroupGone, InvalidInput

FIXTURE = Path(__file__).parent.parent / "fixtures" / "cgroup2"
CRI = "c0ffee00d15ea5e5c0ffee00d15ea5e5c0ffee00d15ea5e5c0ffee00d15ea5e5"


def pod(name, *, label="", phase="Running", containers=("agent",), running=True, annotation=None, cid=CRI):
    statuses = [{"name": c, "containerID": f"containerd://{cid if i == 0 else 'ab' * 32}",
                 "state": {"running": {"startedAt": "2026-12-01T20:00:00Z"}} if running else {"waiting": {}}}
                for i, c in enumerate(containers)]
    meta = {"name": name, "namespace": "agents", "uid": "1b2c3d4e-5f60-4a7b-8c9d-0e1f2a3b4c5d",
            "labels": {"agentcg.io/sandbox": label}}
    if annotation:
        meta["annotations"] = {"agentcg.io/container": annotation}
    return {"metadata": meta, "spec": {"containers": [{"name": c} for c in containers]},
            "status": {"phase": phase, "containerStatuses": statuses}}


def test_running_labelled_pods_become_sandboxes_named_by_the_label():
    pods = {"kind": "PodList", "apiVersion": "v1", "items": [
        pod("swe-task-1", label="task-1"),
        pod("swe-task-2", label="true"),                               # a bare label: the pod's name
        pod("pending", phase="Pending"),
        pod("starting", running=False),
        pod("two", label="two", containers=("sidecar", "agent"), annotation="agent"),
    ]}
    found = pods_to_adopt(pods)
    assert [(p.sandbox, p.pod, p.container) for p in found] == [
        ("task-1", "agents/swe-task-1", "agent"), ("swe-task-2", "agents/swe-task-2", "agent"),
        ("two", "agents/two", "agent")]
    assert found[0].container_id == CRI and found[2].container_id == "ab" * 32
    assert pods_to_adopt({"items": []}) == [] and pods_to_adopt({}) == []


def test_sandbox_names_are_made_safe():
    assert sandbox_name("team/a b:c") == "team-a-b-c"
    assert len(sandbox_name("x" * 200)) == 64 and sandbox_name("..") == "pod"


def test_the_container_cgroup_is_found_below_kubepods(tmp_path):
    mount = tmp_path / "cgroup2"
    shutil.copytree(FIXTURE, mount)
    path = find_container_cgroup(mount, CRI)
    assert path.startswith("kubepods.slice/") and path.endswith(f"cri-containerd-{CRI}.scope")
    with pytest.raises(CgroupGone, match="on this node"):
        find_container_cgroup(mount, "f" * 64)
    with pytest.raises(InvalidInput):
        find_container_cgroup(mount, "../../etc")


class Recorder:
    """Stands in for agentcg.client.Client (no daemon with these fixture cgroups exists)."""

    def __init__(self, exists=()):
        self.requests, self.exists = [], set(exists)

    def request(self, op, args):
        self.requests.append((op, dict(args)))
        if op == "sandbox.adopt" and args["name"] in self.exists:
            raise CgroupExists(f"daemon refused {op} (exists)")
        return {}


def test_reconcile_adopts_new_pods_and_releases_gone_or_restarted_ones(tmp_path):
    mount = tmp_path / "cgroup2"
    shutil.copytree(FIXTURE, mount)
    wanted = pods_to_adopt({"items": [pod("a", label="A")]})
    client = Recorder()
    adopted = reconcile(client, wanted, str(mount), {"old": "12" * 32})
    assert adopted == {"A": CRI}
    assert client.requests[0] == ("sandbox.release", {"name": "old"})
    op, args = client.requests[1]
    assert op == "sandbox.adopt" and args["name"] == "A" and args["cgroup"].endswith(f"cri-containerd-{CRI}.scope")
    assert reconcile(Recorder(), wanted, str(mount), adopted) == adopted            # nothing to do
    # an adopter that restarted finds the daemon holding the sandbox already
    assert reconcile(Recorder(exists={"A"}), wanted, str(mount), {}) == {"A": CRI}
    # the pod restarted: a new container id -> released, and the new container is not on this fixture
    moved = pods_to_adopt({"items": [pod("a", label="A", cid="de" * 32)]})
    client = Recorder()
    assert reconcile(client, moved, str(mount), adopted) == {}
    assert [op for op, _ in client.requests] == ["sandbox.release"]
