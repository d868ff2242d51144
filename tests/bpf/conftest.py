"""Fixtures for the BPF tests: one loaded BpfMonitor per module and throw-away v2 cgroups.

Stand-in until the shared `cgroup_tree` fixture exists: cgroups are created below
/sys/fs/cgroup/unified (or /sys/fs/cgroup on a pure-v2 host) as
`agentcg-test-bpf-<random>` and always removed (cgroup.kill, wait until empty, rmdir).
"""
from __future__ import annotations

import os
import secrets
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest


def _v2_root() -> Path | None:
    for candidate in (Path("/sys/fs/cgroup/unified"), Path("/sys/fs/cgroup")):
        if (candidate / "cgroup.procs").exists() and (candidate / "cgroup.subtree_control").exists():
            return candidate
    return None


@dataclass
class TestCgroup:
    path: Path

    @property
    def id(self) -> int:
        return os.stat(self.path).st_ino

    def run(self, argv: list[str], **kwargs) -> subprocess.CompletedProcess:
        return subprocess.run(argv, preexec_fn=self.enter, **kwargs)

    def popen(self, argv: list[str], **kwargs) -> subprocess.Popen:
        return subprocess.Popen(argv, preexec_fn=self.enter, **kwargs)

    def enter(self) -> None:
        """preexec_fn: move the child into this cgroup before it execs."""
        with open(self.path / "cgroup.procs", "w") as f:
            f.write("0")

    def remove(self) -> None:
        if not self.path.exists():
            return
        (self.path / "cgroup.kill").write_text("1")
        deadline = time.monotonic() + 10
        while "populated 1" in (self.path / "cgroup.events").read_text():
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.path} still populated after cgroup.kill")
            time.sleep(0.01)
        os.rmdir(self.path)


@pytest.fixture
def make_cgroup() -> Iterator:
    root = _v2_root()
    if root is None or os.geteuid() != 0:
        pytest.skip("needs root and a cgroup v2 tree (/sys/fs/cgroup/unified or /sys/fs/cgroup)")
    made: list[TestCgroup] = []

    def make() -> TestCgroup:
        path = root / f"agentcg-test-bpf-{secrets.token_hex(4)}"
        path.mkdir()
        made.append(TestCgroup(path))
        return made[-1]

    try:
        yield make
    finally:
        for cg in made:
            cg.remove()
