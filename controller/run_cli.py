"""`agentcg run --sandbox S -- CMD...`: one command as one tool call."""
from __future__ import annotations

import os
import signal as signals
import subprocess
import sys
from pathlib import Path
from typing import Any

import click

from agentcg.records import ToolCallRecord, shell_exit_code, status_of
from agentcg.units import format_bytes, format_seconds

FORWARDED_SIGNALS = (signals.SIGTERM, signals.SIGHUP, signals.SIGINT, signals.SIGQUIT)


def common_options(f: Any) -> Any:
    """Options `run` and `sandbox exec` share: where cgroups, state and records go."""
    f = click.option("--records", "records", type=click.Path(dir_okay=False, path_type=Path),
                     envvar="AGENTCG_RECORDS", help="Append each record as a JSON line to FILE (env AGENTCG_RECORDS).")(f)
    f = click.option("--root", default="agentcg", envvar="AGENTCG_ROOT", show_default=True,
                     help="cgroup root below each hierarchy (env AGENTCG_ROOT).")(f)
    f = click.option("--state-dir", type=click.Path(file_okay=False, path_type=Path), envvar="AGENTCG_STATE_DIR",
                     help="Owner files and locks (default /run/agentcg; env AGENTCG_STATE_DIR).")(f)
    f = click.option("--grace", default=None,
                     help="How long background processes may outlive the call before they are killed "
                          "(default 5s; through the daemon, its [limits] grace_s).")(f)
    f = click.option("--json", "as_json", is_flag=True, help="Write records to stderr as JSON lines.")(f)
    f = click.option("--no-ebpf", is_flag=True, help="Do not load the eBPF programs (eBPF fields stay null).")(f)
    return f


@click.command()
@click.option("--sandbox", "sandbox", required=True, help="Sandbox name (created for the call if missing).")
@click.option("--tool", default=None, help="Tool name for the record (default: the program's basename).")
@click.option("--mem-hint", default=None, help="Expected peak memory, e.g. 512M (recorded; policies may use it).")
@click.option("--priority", default="normal", show_default=True, help="high, normal or low (CPU weight 400/100/25).")
@common_options
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
def run(sandbox: str, tool: str | None, mem_hint: str | None, priority: str, records: Path | None, root: str,
        state_dir: Path | None, grace: str | None, as_json: bool, no_ebpf: bool, command: tuple[str, ...]) -> None:
    """Run COMMAND as one tool call in <root>/<sandbox>/tools/<call-id>.

    stdin, stdout, stderr and the exit code pass through (a signal death exits 128+N;
    a program that does not exist exits 127); the record goes to stderr. With the daemon
    running the call goes through it (a daemon restart while COMMAND runs is waited for,
    $AGENTCG_RECONNECT_S, default 120 s); otherwise (root) the cgroups are made here and the
    eBPF programs are loaded for this one call, which adds about 0.3-1 s: use --no-ebpf
    to skip that, or run the daemon.
    """
    from agentcg.controller.client import Client
    from agentcg.errors import AgentcgError
    from agentcg.controller.sandbox import parse_priority, validate_name
    from agentcg.units import parse_duration, parse_size

    validate_name(sandbox)
    parse_priority(priority)
    grace_s = parse_duration(grace, what="--grace") if grace is not None else None
    mem_hint_bytes = parse_size(mem_hint, what="--mem-hint") if mem_hint is not None else None
    if mem_hint_bytes == 0:
        mem_hint_bytes = None
    argv = list(command)
    with Client(root=root, state=state_dir, records_path=records, ebpf=not no_ebpf, grace_s=grace_s) as client:
        call = client.begin(sandbox, tool, argv, mem_hint_bytes=mem_hint_bytes, priority=priority)
        returncode = 127
        try:
            try:
                proc = call.spawn(argv)
            except FileNotFoundError:
                click.echo(f"agentcg: {argv[0]}: command not found", err=True)
            except (PermissionError, IsADirectoryError, NotADirectoryError) as exc:
                click.echo(f"agentcg: {argv[0]}: {exc.strerror}", err=True)
                returncode = 126
            else:
                returncode = _wait_forwarding(proc)
        finally:
            try:
                record = call.finish(*status_of(returncode))
            except AgentcgError as exc:   # the command ran: its status wins over a lost record
                click.echo(f"agentcg: the tool call's record is lost: {exc}", err=True)
                record = None
        if record is not None:
            emit_record(record, as_json)
    sys.exit(shell_exit_code(returncode))


def _wait_forwarding(proc: subprocess.Popen) -> int:
    """Wait for the child, passing SIGTERM/SIGHUP/SIGINT/SIGQUIT on to it."""
    previous = {}

    def forward(signum: int, _frame: Any) -> None:
        try:
            os.kill(proc.pid, signum)
        except ProcessLookupError:
            pass

    for signum in FORWARDED_SIGNALS:
        previous[signum] = signals.signal(signum, forward)
    try:
        return proc.wait()
    finally:
        for signum, handler in previous.items():
            signals.signal(signum, handler)


def emit_record(record: ToolCallRecord, as_json: bool) -> None:
    click.echo(record.to_json() if as_json else format_record(record), err=True)


def format_record(r: ToolCallRecord) -> str:
    def opt(value: Any, fmt: Any) -> str:
        return "-" if value is None else fmt(value)

    status = f"exit {r.exit_code}" if r.signal is None else f"signal {r.signal}"
    parts = [
        f"agentcg: {r.sandbox}/{r.call_id} {r.tool}: {r.outcome} ({status})",
        f"wall {opt(r.duration_s, format_seconds)}", f"cpu {opt(r.cpu_s, format_seconds)}",
        f"peak {opt(r.peak_memory_bytes, format_bytes)} (rss {opt(r.peak_rss_bytes, format_bytes)})",
        f"faults {opt(r.page_faults, str)}",
        f"runq p50/p99 {opt(r.runq_latency_p50_s, format_seconds)}/{opt(r.runq_latency_p99_s, format_seconds)}",
    ]
    if r.oom_killed:
        parts.append("OOM-killed")
    if r.message:
        parts.append(r.message)
    return ", ".join(parts)
