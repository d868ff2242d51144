"""`agentcg demo`: what agentcg does on this host in about ten seconds.

1. the doctor, one line per status;
2. `agentcg report` of the traces agentcg recorded itself (the repository's `traces/`);
3. a live `agentcg profile` of a small agent-like bash session (three commands, one
   allocating memory) and the report of that recording.
Everything it creates (the sandbox's cgroups, the trace in a temporary directory) is
removed before it returns, also when it fails or is interrupted.
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import click

from agentcg.errors import InvalidInput
from agentcg.units import format_bytes, parse_size

DEMO_ROOT = "agentcg-demo"
MAX_ALLOC_BYTES = 1 << 30
TRACES_DIR = Path(__file__).resolve().parent.parent / "traces"


def demo_session_argv(alloc_bytes: int) -> list[str]:
    """Three commands like an agent's: a listing, a Python step that touches `alloc_bytes`
    (every page, so the cgroup is charged all of it) and a short sleep."""
    python = f"{sys.executable} -c 'import time; x = bytearray({alloc_bytes}); time.sleep(0.3)'"
    return ["bash", "-c", f"ls / >/dev/null; {python}; sleep 0.2"]


def format_doctor_short(report) -> str:
    """The doctor's checks grouped by status, one line each, then the core verdict."""
    from agentcg.controller.doctor import STATUSES

    lines = []
    for status in STATUSES:
        names = [c.name for c in report.checks if c.status == status]
        if names:
            lines.append(f"  {status + ':':<13}{', '.join(names)}")
    core = "ok" if report.core_ok else "NOT ok: " + ", ".join(report.core_failures)
    lines.append(f"  core (BPF and cgroups): {core} (details and fixes: agentcg doctor)")
    return "\n".join(lines)


def shipped_traces(directory: Path = TRACES_DIR) -> list[Path]:
    return sorted(directory.glob("*.zip")) if directory.is_dir() else []


@click.command()
@click.option("--alloc", default="100M", show_default=True, help="Memory the demo's Python step allocates.")
@click.option("--skip-doctor", is_flag=True, help="Do not print the doctor first.")
@click.option("--root", default=DEMO_ROOT, envvar="AGENTCG_ROOT", show_default=True,
              help="cgroup root of the demo's sandbox (env AGENTCG_ROOT).")
def demo(alloc: str, skip_doctor: bool, root: str) -> None:
    """Doctor, the report of the recorded traces, then a short live profile and its report."""
    from agentcg.controller.doctor import probe_host
    from agentcg.controller.doctor_cli import raise_unless_core_ok
    from agentcg.controller.profile_session import profile_command
    from agentcg.profiler.report import build_report, render_text
    from agentcg.profiler.trace import read_trace

    alloc_bytes = parse_size(alloc, what="--alloc")
    if not 0 < alloc_bytes <= MAX_ALLOC_BYTES:
        raise InvalidInput(f"--alloc: between 1 byte and {format_bytes(MAX_ALLOC_BYTES)}, got {alloc}")
    report = probe_host()
    if not skip_doctor:
        click.echo("== agentcg doctor (short) ==")
        click.echo(format_doctor_short(report))
        click.echo()
    raise_unless_core_ok(report)

    traces = shipped_traces()
    click.echo(f"== agentcg report {' '.join(f'traces/{p.name}' for p in traces) or '(no traces/)'} ==")
    if traces:
        from agentcg.profiler.report import merge_traces

        click.echo(render_text(build_report(merge_traces([read_trace(p) for p in traces]))))
    else:
        click.echo(f"  {TRACES_DIR} holds no traces (agentcg installed outside its repository)")
    click.echo()

    argv = demo_session_argv(alloc_bytes)
    click.echo(f"== agentcg profile -- bash -c '<ls; python allocating {format_bytes(alloc_bytes)}; sleep 0.2>' ==")
    with tempfile.TemporaryDirectory(prefix="agentcg-demo-") as tmp:
        trace = Path(tmp) / "demo-trace"
        summary = profile_command(argv, trace, interval_s=0.05, root=root, state=Path(tmp) / "state")
        click.echo()
        click.echo(f"== agentcg report {trace.name} ==")
        click.echo(render_text(build_report(read_trace(trace))))
    if summary.returncode:
        raise click.ClickException(f"the demo session exited {summary.returncode}")
