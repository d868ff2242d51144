"""Small helpers shared by the tests (on sys.path through pytest's `pythonpath`)."""
from __future__ import annotations

import os
import secrets
import subprocess
import time
from pathlib import Path
from typing import Callable, Iterator


def wait_until(predicate: Callable[[], object], timeout_s: float = 10.0, poll_s: float = 0.01) -> bool:
    """Poll `predicate` until it is true or `timeout_s` passes; its last answer, as a bool."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(poll_s)
    return bool(predicate())


def profile_env(tmp_path: Path, name: str) -> Iterator[dict[str, str]]:
    """For a fixture (`yield from`): the environment for an `agentcg profile` child with its
    own cgroup root and state dir; afterwards whatever it left is removed, then the test fails."""
    from agentcg.controller.doctor_pytest import require

    require("cgroup_layout", "cgroup_v2_freeze_kill", "bcc_load")
    root = f"agentcg-test-{name}-{secrets.token_hex(4)}"
    environ = {**os.environ, "AGENTCG_ROOT": root, "AGENTCG_STATE_DIR": str(tmp_path / "state")}
    try:
        yield environ
    finally:
        left = [str(p) for p in Path("/sys/fs/cgroup").glob(f"*/{root}")] + \
            [str(p) for p in Path("/sys/fs/cgroup").glob(root)]
        for path in sorted(left, key=len, reverse=True):   # clean up after a failure, then fail
            subprocess.run(["find", path, "-depth", "-type", "d", "-exec", "rmdir", "{}", ";"], check=False)
        assert not left, f"profile left cgroups behind: {left}"
