"""Podman helpers for tests/containers (the fixtures are in tests/containers/conftest.py)."""
from __future__ import annotations

import os
import subprocess

IMAGE = "localhost/agentcg-busybox:2"
PODMAN = ["podman", "--cgroup-manager=cgroupfs", "--runtime", "runc"]
RUN_ARGS = ["--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024", "-v", "/usr:/usr:ro"]


def podman(*args: str, timeout_s: float = 60.0, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run([*PODMAN, *args], capture_output=True, text=True, timeout=timeout_s,
                          stdin=subprocess.DEVNULL)
    if check and done.returncode != 0:
        raise AssertionError(f"podman {' '.join(args)} exited {done.returncode}: {done.stderr.strip()[-500:]}")
    return done



def init_pid(container_id: str) -> int:
    return int(podman("inspect", "--format", "{{.State.Pid}}", container_id).stdout.strip())


def cgroup_dirs(container_id: str) -> list[str]:
    """Every directory of the container's cgroup and below, in every hierarchy."""
    out = []
    for mount in sorted(p for p in os.listdir("/sys/fs/cgroup") if os.path.isdir(f"/sys/fs/cgroup/{p}")):
        base = f"/sys/fs/cgroup/{mount}/libpod_parent/libpod-{container_id}"
        for root, dirs, _ in os.walk(base):
            out.append(root)
    return sorted(out)
