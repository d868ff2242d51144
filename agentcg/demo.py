"""`agentcg demo`: the doctor's table, then one command run in its own cgroup and what it
cost (peak memory from the cgroup, CPU seconds), then the cgroup removed."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass

import click

from agentcg.errors import CgroupError, InvalidInput
from agentcg.units import format_bytes, format_seconds, parse_size

DEMO_ROOT = "agentcg-demo"
DEMO_TIMEOUT_S = 30.0
MAX_ALLOC_BYTES = 1 << 30
# Touches every page (b"\x01" * n writes them), so the cgroup charges all of it.
ALLOC_SCRIPT = "import sys, time; data = b'\\x01' * int(sys.argv[1]); time.sleep(0.05)"


@click.command()
@click.option("--alloc", default="64M", show_default=True, help="Memory the demo command allocates.")
@click.option("--skip-doctor", is_flag=True, help="Do not print the doctor's table first.")
def demo(alloc: str, skip_doctor: bool) -> None:
    """Doctor, then a command that allocates memory, run in its own cgroup."""
    from agentcg.controller.doctor import probe_host
    from agentcg.controller.doctor_cli import format_report, raise_unless_core_ok

    alloc_bytes = parse_size(alloc, what="--alloc")
    if not 0 < alloc_bytes <= MAX_ALLOC_BYTES:
        raise InvalidInput(f"--alloc: between 1 byte and {format_bytes(MAX_ALLOC_BYTES)}, got {alloc}")
    report = probe_host()
    if not skip_doctor:
        click.echo(format_report(report))
        click.echo()
    raise_unless_core_ok(report)
    result = run_in_cgroup(alloc_bytes)
    click.echo(f"cgroup {result.cgroup} ({result.kind}): ran `{result.command}`")
    click.echo(f"  exit code     {result.exit_code}")
    click.echo(f"  wall time     {format_seconds(result.wall_s)}")
    click.echo(f"  peak memory   {format_bytes(result.peak_memory_bytes)} (asked for {format_bytes(alloc_bytes)})")
    click.echo(f"  CPU time      {format_seconds(result.cpu_s)}")
    click.echo(f"  removed       {result.cgroup}")


@dataclass(frozen=True)
class DemoResult:
    cgroup: str
    kind: str
    command: str
    exit_code: int
    wall_s: float
    peak_memory_bytes: int
    cpu_s: float


def run_in_cgroup(alloc_bytes: int, *, root: str = DEMO_ROOT) -> DemoResult:
    """Create `<root>/call-<pid>`, run the allocating command in it, measure, remove it."""
    from agentcg.controller.cgroup import open_tree

    tree = open_tree(root=root)
    name = f"call-{os.getpid()}"
    argv = [sys.executable, "-c", ALLOC_SCRIPT, str(alloc_bytes)]
    tree.create(name)
    try:
        start = time.monotonic()
        child = tree.spawn(name, argv)
        try:
            exit_code = child.wait(timeout=DEMO_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
            raise CgroupError(f"the demo command ran past {DEMO_TIMEOUT_S:.0f} s and was killed") from None
        wall_s = time.monotonic() - start
        peak_memory_bytes = tree.memory_peak(name)
        cpu_s = tree.cpu_stat(name).usage_s
    finally:
        tree.remove(name)
        # The root is shared by concurrent demos: remove it only when nothing is below it.
        if not tree.children("") and not tree.is_populated(""):
            tree.remove("")
    return DemoResult(cgroup=f"{root}/{name}", kind=tree.kind, command=f"python3 -c <allocate {alloc_bytes} bytes>",
                      exit_code=exit_code, wall_s=wall_s, peak_memory_bytes=peak_memory_bytes, cpu_s=cpu_s)
