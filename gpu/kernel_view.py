"""SSD offload seen from the kernel: the store's own byte count beside the block-layer bytes
that agentcg's BPF monitor charged to the cgroup doing the I/O.

A child process in a throw-away v2 cgroup (`agentcg-gpu-kview-<random>`, removed in every
case) offloads and loads `nbytes` through a TieredKVStore and prints what its records say;
the parent watches that cgroup with BpfMonitor(concerns=("block",)). With O_DIRECT the I/O
is issued by the child itself, so the kernel's bytes should match the store's (plus file
system metadata); buffered writes may be issued by writeback workers and escape the cgroup.
"""
from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from agentcg.errors import AgentcgError, HostUnsupported

CHILD = """
import json, sys
from agentcg.gpu.bench import geometry_for
from agentcg.gpu.kvstore import TieredKVStore
ssd_dir, nbytes = sys.argv[1], int(sys.argv[2])
block = 2**20
n = max(1, nbytes // block)
with TieredKVStore(geometry_for(block), n, 1, ssd_dir, n) as store:
    store.allocate("k", n)
    store.device.pool.fill_(1)
    written = sum(r.bytes for r in store.offload("k").wait())
    read = sum(r.bytes for r in store.load("k").wait())
    print(json.dumps({"written": written, "read": read, "io_mode": store.ssd.io_mode}))
"""


@dataclass(frozen=True)
class KernelView:
    store_write_bytes: int
    store_read_bytes: int
    kernel_write_bytes: int
    kernel_read_bytes: int
    io_mode: str
    cgroup_path: str              # the throw-away cgroup the child ran in (removed again)


def _v2_root() -> Path:
    for candidate in (Path("/sys/fs/cgroup/unified"), Path("/sys/fs/cgroup")):
        if (candidate / "cgroup.procs").exists() and (candidate / "cgroup.subtree_control").exists():
            return candidate
    raise HostUnsupported("no cgroup v2 hierarchy mounted: the kernel view needs cgroup ids")


def _remove(path: Path) -> None:
    if not path.exists():
        return
    if (path / "cgroup.kill").exists():
        (path / "cgroup.kill").write_text("1")
    deadline = time.monotonic() + 10
    while "populated 1" in (path / "cgroup.events").read_text():
        if time.monotonic() > deadline:
            raise AgentcgError(f"{path} still has processes after cgroup.kill; remove it by hand")
        time.sleep(0.01)
    os.rmdir(path)


def measure(ssd_dir: str | os.PathLike, nbytes: int, timeout_s: float = 120.0) -> KernelView:
    """Raises HostUnsupported/BpfError where the host cannot do it."""
    from agentcg.bpf.monitor import BpfMonitor

    cgroup = _v2_root() / f"agentcg-gpu-kview-{secrets.token_hex(4)}"
    os.mkdir(cgroup)
    try:
        with BpfMonitor(concerns=("block",)) as monitor:
            cgroup_id = os.stat(cgroup).st_ino
            monitor.watch(cgroup_id)

            def enter() -> None:
                with open(cgroup / "cgroup.procs", "w") as f:
                    f.write("0")

            done = subprocess.run([sys.executable, "-c", CHILD, str(ssd_dir), str(nbytes)], preexec_fn=enter,
                                  capture_output=True, text=True, timeout=timeout_s)
            if done.returncode != 0:
                raise AgentcgError(f"kernel view: the store child failed: {done.stderr.strip()[-500:]}")
            counters = monitor.forget(cgroup_id)
        store = json.loads(done.stdout.strip().splitlines()[-1])
        return KernelView(store["written"], store["read"], counters.block_write_bytes or 0,
                          counters.block_read_bytes or 0, store["io_mode"], str(cgroup))
    finally:
        _remove(cgroup)
