"""`agentcg report`, `agentcg import agentcgroup` and `agentcg profile`.

pandas, pyarrow and matplotlib are imported inside the commands, so listing the
commands stays light.
"""
from __future__ import annotations

from pathlib import Path

import click

from agentcg.errors import InvalidInput
from agentcg.units import parse_duration, parse_size


@click.command("report")
@click.argument("traces", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--plots", "plots_dir", type=click.Path(file_okay=False, path_type=Path),
              help="Write PNG charts into this directory.")
@click.option("--plot-limit", default=12, show_default=True, type=click.IntRange(min=0),
              help="Per-session charts for the sessions with the highest peak-to-mean memory (0: all).")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON instead of tables.")
@click.option("--session", "session_ids", multiple=True, help="Only this session (repeatable).")
@click.option("--burst-threshold", default="300MB", show_default=True,
              help="A memory rise at least this big within --burst-window is a burst.")
@click.option("--burst-window", default="10s", show_default=True, help="How far back a burst's rise may start.")
def report(traces: tuple[Path, ...], plots_dir: Path | None, plot_limit: int, as_json: bool,
           session_ids: tuple[str, ...], burst_threshold: str, burst_window: str) -> None:
    """Characterise recorded sessions: where wall time goes, tool calls per tool,
    memory peaks, bursts and what a static memory limit would waste."""
    from agentcg.profiler.report import build_report, merge_traces, render_json, render_text
    from agentcg.profiler.trace import read_trace, TABLES

    threshold = parse_size(burst_threshold, what="--burst-threshold")
    window = parse_duration(burst_window, what="--burst-window")
    trace = merge_traces([read_trace(path) for path in traces])
    if session_ids:
        unknown = sorted(set(session_ids) - set(trace.sessions["session_id"]))
        if unknown:
            raise InvalidInput(f"--session {unknown[0]!r}: no such session in the trace(s)")
        for name in TABLES:
            table = trace.table(name)
            setattr(trace, name, table[table["session_id"].isin(session_ids)].reset_index(drop=True))
    result = build_report(trace, burst_threshold_bytes=threshold, burst_window_s=window)
    click.echo(render_json(result) if as_json else render_text(result))
    if plots_dir is not None:
        from agentcg.profiler.plots import write_plots

        ranked = sorted((s for s in result.sessions if s.memory is not None),
                        key=lambda s: -(s.memory.peak_to_mean or 0))
        chosen = [s.session_id for s in (ranked if plot_limit == 0 else ranked[:plot_limit])]
        paths = write_plots(trace, plots_dir, chosen)
        click.echo(f"wrote {len(paths)} chart(s) to {plots_dir}", err=True)


@click.group("import")
def import_trace() -> None:
    """Convert external traces into agentcg traces."""


@import_trace.command("agentcgroup")
@click.argument("directory", required=False, type=click.Path(file_okay=False, path_type=Path))
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path),
              help="Trace to write: a directory, or one file if it ends in .zip.")
@click.option("--attempt", type=click.IntRange(min=0), help="Only attempt_N of each task (default: every attempt).")
@click.option("--force", is_flag=True, help="Replace the output trace if it exists.")
@click.option("--strict", is_flag=True, help="Fail (exit 2) if any task folder had to be skipped; write nothing.")
@click.option("--quiet", "-q", is_flag=True, help="No per-session lines; skips, flags and the summary still print.")
def import_agentcgroup_cmd(directory: Path | None, output: Path, attempt: int | None, force: bool, strict: bool,
                           quiet: bool) -> None:
    """Import AgentCgroup sessions from DIRECTORY (default: the shared copy at $AGENTCG_DATASETS
    or <repo>/../shared/datasets/agentcgroup-swe-local).

    Reads the repository's published layout (<task>/attempt_<n>/ with results.json,
    tool_calls.json, resources.json, trace.jsonl), flat task folders and our reshaped copy
    (meta.json, llm_calls.json). Prints one line per session imported, one per task skipped
    with the reason, the implausible values it flagged and a summary. Exits 1 when a task
    yielded nothing (the trace holds the others), 2 with --strict (nothing written)."""
    import shutil

    from agentcg.profiler.importers.agentcgroup import default_dataset_dir, import_agentcgroup
    from agentcg.profiler.trace import MANIFEST, write_trace

    if output.exists():
        if not force:
            raise InvalidInput(f"{output}: already exists; pass --force to replace it")
        if output.is_dir() and not (output / MANIFEST).exists():
            raise InvalidInput(f"{output}: a directory that is not a trace; refusing to replace it")
    result = import_agentcgroup(directory or default_dataset_dir(), attempt=attempt)
    for report in result.reports:
        if not quiet:
            click.echo(report.line())
        for item in report.skipped:
            click.echo(f"agentcg: {report.session_id}: left out {item}", err=True)
    for skipped in result.skipped:
        click.echo(f"agentcg: skipped {skipped.task}: {skipped.reason}", err=True)
    for flag in result.flags:
        click.echo(f"agentcg: implausible: {flag}", err=True)
    if strict and result.skipped:
        raise InvalidInput(f"{len(result.skipped)} task folder(s) skipped (see above); nothing written")
    if output.exists():
        shutil.rmtree(output) if output.is_dir() else output.unlink()
    write_trace(result.trace, output)
    tools = ", ".join(f"{tool} {n}" for tool, n in result.tool_counts.items())
    click.echo(f"tasks: {result.tasks} imported, {len(result.skipped)} skipped")
    click.echo(f"tool calls: {result.tool_calls} imported, {result.skipped_tool_calls} in skipped tasks ({tools})")
    click.echo(f"LLM requests: {result.llm_requests} ({result.tasks_without_llm_log} task(s) without an LLM log)")
    click.echo(f"samples: {result.samples} ({result.unmeasured_samples} with no container to measure)")
    click.echo(result.summary_line())
    click.echo(f"wrote {output}")
    if result.skipped:
        click.echo(f"agentcg: {len(result.skipped)} task(s) yielded nothing (see above); "
                   f"{output} holds the other {result.tasks}", err=True)
        click.get_current_context().exit(1)
