"""Real Podman containers for the container-sandbox tests, always removed afterwards.

`podman_ready` skips (with the reason) when this host cannot run them: not root, no podman
or runc, or no local image (`bash scripts/host.sh setup` imports it from busybox-static).
Podman runs as this hybrid host needs it: the cgroupfs manager, runc (crun refuses hybrid
cgroups), rlimits no higher than the VM allows. `containers()` starts containers named
`agentcg-test-<hex>` and `podman rm -f`s every one at teardown, even when the test failed.
"""
from __future__ import annotations

import os
import secrets
import shutil
import contextlib
from typing import Any, Callable, Iterator

import pytest

from containerutil import IMAGE, RUN_ARGS, podman

CONCERNS = ["process", "memory", "sched", "block", "exit_codes"]


@pytest.fixture(scope="session")
def podman_ready() -> None:
    if os.geteuid() != 0:
        pytest.skip("container tests need root (cgroups, BPF, rootful podman)")
    for tool in ("podman", "runc"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed (bash scripts/host.sh setup installs podman and runc)")
    if podman("image", "exists", IMAGE, check=False).returncode != 0:
        pytest.skip(f"no local image {IMAGE} (bash scripts/host.sh setup imports it from busybox-static)")
    probe = podman("run", "--rm", *RUN_ARGS, IMAGE, "true", check=False)
    if probe.returncode != 0:
        pytest.skip(f"podman cannot run containers here: {probe.stderr.strip()[-300:]}")


@pytest.fixture
def containers(podman_ready: None) -> Iterator[Callable[..., str]]:
    """start(*command, extra=[...]) -> the container's full id; all removed at teardown."""
    names: list[str] = []

    def start(*command: str, extra: tuple[str, ...] = ()) -> str:
        name = f"agentcg-test-{secrets.token_hex(4)}"
        names.append(name)
        return podman("run", "-d", "--name", name, *RUN_ARGS, *extra, IMAGE, *(command or ("sleep", "600")))\
            .stdout.strip()

    try:
        yield start
    finally:
        for name in names:
            podman("rm", "-f", "-t", "0", name, check=False)
        left = [n for n in names if podman("container", "exists", n, check=False).returncode == 0]
        assert not left, f"containers left behind: {left}"


@pytest.fixture
def adopting_daemon(podman_ready: None) -> Iterator[Callable[..., Any]]:
    """daemon(policy=...) -> a DaemonProcess with eBPF (and exit codes) on; stopped and its
    cgroup root removed at teardown. Released or not, the containers go with `containers`."""
    from agentcg.controller.daemon.testing import DaemonProcess

    started: list[DaemonProcess] = []

    def start(**sections: dict[str, Any]) -> DaemonProcess:
        d = DaemonProcess({"ebpf": {"mode": "on", "concerns": CONCERNS}, "policy": {"name": "none"}, **sections})
        started.append(d)
        d.start()
        return d

    try:
        yield start
    finally:
        for d in started:
            with contextlib.suppress(Exception):
                for sandbox in d.result("sandbox.list")["sandboxes"]:
                    d.request("sandbox.release", name=sandbox["name"])
            d.cleanup()
