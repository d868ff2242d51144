"""`agentcg sandbox adopt-pods`: on a Kubernetes node, adopt every pod with a label as a
sandbox, and release it when the pod goes (deploy/kubernetes runs it beside the daemon).

Each pass lists this node's pods with the label (in-cluster API: the pod's service
account token, `fieldSelector=spec.nodeName=<node>`), takes the container named by the
annotation `agentcg.io/container` (default: the pod's first container), finds its cgroup
by the container id below the kubelet's tree (`kubepods*`), and asks the daemon to adopt
it as sandbox `<label value or pod name>`. Sandboxes it adopted whose pod is gone or
restarted are released. The API answer is data (`pods_to_adopt`), the cgroup lookup a
bounded walk (`find_container_cgroup`): both tested on fixtures; the HTTP call needs a cluster.
"""
from __future__ import annotations

import json
import os
import re
import ssl
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from agentcg.errors import AgentcgError, CgroupExists, CgroupGone, InvalidInput

DEFAULT_LABEL = "agentcg.io/sandbox"
CONTAINER_ANNOTATION = "agentcg.io/container"
SERVICE_ACCOUNT = Path("/var/run/secrets/kubernetes.io/serviceaccount")
API_TIMEOUT_S = 10.0
MAX_PODS = 1024
MAX_WALK_DIRS = 20_000
KUBEPODS_DEPTH = 5
_ID_RE = re.compile(r"^[a-z0-9-]+://([0-9a-f]{12,64})$")
_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")


@dataclass(frozen=True)
class PodContainer:
    sandbox: str          # the sandbox name to adopt it as
    pod: str              # namespace/name
    pod_uid: str
    container: str
    container_id: str     # without the runtime:// prefix


def sandbox_name(text: str) -> str:
    """A label value or pod name as a sandbox name: [A-Za-z0-9_.-], at most 64."""
    name = _UNSAFE.sub("-", text)[:64].strip(".") or "pod"
    return name


def pods_to_adopt(pod_list: dict[str, Any], label: str = DEFAULT_LABEL) -> list[PodContainer]:
    """The running containers to adopt from a `/api/v1/pods` answer (a PodList)."""
    out = []
    for pod in (pod_list.get("items") or [])[:MAX_PODS]:
        meta, status = pod.get("metadata") or {}, pod.get("status") or {}
        if status.get("phase") != "Running":
            continue
        statuses = status.get("containerStatuses") or []
        wanted = (meta.get("annotations") or {}).get(CONTAINER_ANNOTATION)
        names = [c.get("name") for c in (pod.get("spec") or {}).get("containers") or []]
        target = wanted or (names[0] if names else None)
        chosen = next((s for s in statuses if s.get("name") == target), None)
        match = _ID_RE.match(str((chosen or {}).get("containerID", "")))
        if chosen is None or match is None or "running" not in (chosen.get("state") or {}):
            continue
        value = (meta.get("labels") or {}).get(label) or ""
        name = sandbox_name(value if value not in ("", "true") else meta.get("name", "pod"))
        out.append(PodContainer(name, f"{meta.get('namespace', 'default')}/{meta.get('name', '')}",
                                str(meta.get("uid", "")), str(target), match.group(1)))
    return out


def find_container_cgroup(v2_mount: str | os.PathLike, container_id: str) -> str:
    """The cgroup (below the mount) of a Kubernetes container: a directory below kubepods*
    named `<id>`, `cri-containerd-<id>.scope`, `crio-<id>.scope` or `docker-<id>.scope`."""
    if not re.fullmatch(r"[0-9a-f]{12,64}", container_id):
        raise InvalidInput(f"container id {container_id!r} is not 12..64 hex characters")
    mount = Path(v2_mount)
    seen = 0
    starts = sorted(p for p in mount.iterdir() if p.is_dir() and p.name.startswith("kubepods")) \
        if mount.is_dir() else []
    stack = [(p, 1) for p in starts]
    while stack:
        directory, depth = stack.pop()
        seen += 1
        if seen > MAX_WALK_DIRS:
            break
        name = directory.name
        if name == container_id or (name.endswith(".scope") and container_id in name):
            return str(directory.relative_to(mount))
        if depth < KUBEPODS_DEPTH:
            try:
                stack.extend((c, depth + 1) for c in directory.iterdir() if c.is_dir() and not c.is_symlink())
            except OSError:
                continue
    raise CgroupGone(f"no cgroup of container {container_id[:12]} below {mount}/kubepods*: is it on this node?")


def list_node_pods(node: str, label: str = DEFAULT_LABEL, api: str = "https://kubernetes.default.svc",
                   account: Path = SERVICE_ACCOUNT) -> dict[str, Any]:
    """GET /api/v1/pods for this node and label, with the pod's service account."""
    query = urllib.parse.urlencode({"labelSelector": label, "fieldSelector": f"spec.nodeName={node}"})
    request = urllib.request.Request(f"{api}/api/v1/pods?{query}",
                                     headers={"Authorization": f"Bearer {(account / 'token').read_text().strip()}"})
    context = ssl.create_default_context(cafile=str(account / "ca.crt"))
    try:
        with urllib.request.urlopen(request, timeout=API_TIMEOUT_S, context=context) as response:
            return json.loads(response.read(32 << 20))
    except (OSError, ValueError) as exc:
        raise AgentcgError(f"listing pods on node {node} from {api}: {exc}") from None


def reconcile(client: Any, wanted: Iterable[PodContainer], v2_mount: str, adopted: dict[str, str]) -> dict[str, str]:
    """Adopt what is wanted and not adopted, release what this adopter adopted and is no
    longer wanted (or whose container id changed). `adopted`: sandbox -> container id."""
    wanted_by_name = {p.sandbox: p for p in wanted}
    now = dict(adopted)
    for name, container_id in adopted.items():
        pod = wanted_by_name.get(name)
        if pod is None or pod.container_id != container_id:
            try:
                client.request("sandbox.release", {"name": name})
            except AgentcgError:
                pass       # released already (the container exited)
            now.pop(name)
    for name, pod in wanted_by_name.items():
        if name in now:
            continue
        try:
            cgroup = find_container_cgroup(v2_mount, pod.container_id)
            client.request("sandbox.adopt", {"name": name, "cgroup": cgroup, "runtime": "kubernetes",
                                             "container_id": pod.container_id})
            now[name] = pod.container_id
        except CgroupExists:
            now[name] = pod.container_id     # the daemon has it already (an adopter restarted)
        except AgentcgError as exc:
            print(f"agentcg adopt-pods: {pod.pod} ({pod.container}): {exc}", flush=True)
    return now
