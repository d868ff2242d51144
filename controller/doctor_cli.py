"""`agentcg doctor [--json]`: what this host can do, each item with its status and fix.

Exits 0 when the core (BPF and cgroups, see `doctor.CORE_CHECKS`) is usable, 1 otherwise.
"""
from __future__ import annotations

import json

import click

from agentcg.controller.doctor import OK, HostReport, HostRoots, probe_host
from agentcg.errors import HostUnsupported

_NAME_WIDTH, _STATUS_WIDTH = 22, 12


def format_report(report: HostReport) -> str:
    """The human table: name, status, detail; the fix on a second line when not ok."""
    lines = []
    for check in report.checks:
        lines.append(f"{check.name:<{_NAME_WIDTH}}{check.status:<{_STATUS_WIDTH}}{check.detail}")
        if check.status != OK and check.fix:
            lines.append(f"{'':<{_NAME_WIDTH + _STATUS_WIDTH}}fix: {check.fix}")
    core = "ok" if report.core_ok else "NOT ok: " + ", ".join(report.core_failures)
    lines.append(f"core (BPF and cgroups): {core}; probed in {report.elapsed_s:.2f} s")
    return "\n".join(lines)


def raise_unless_core_ok(report: HostReport) -> None:
    if not report.core_ok:
        raise HostUnsupported(f"core features not usable: {', '.join(report.core_failures)}; "
                              "see the fix beside each in `agentcg doctor`")


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (checks, core_ok) instead of a table.")
@click.option("--root", type=click.Path(exists=True, file_okay=False), hidden=True,
              help="Probe files below this directory (a captured or fixture host tree).")
def doctor(as_json: bool, root: str | None) -> None:
    """Report what this host can do (BPF, BTF, bcc, cgroups, PSI, GPUs), with fixes."""
    report = probe_host(HostRoots.under(root) if root else None)
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
    else:
        click.echo(format_report(report))
    raise_unless_core_ok(report)
