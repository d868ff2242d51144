"""`agentcg profile`: record a live agent session as a trace (the session runs on the host's
cgroups and eBPF, so it is controller work; the trace format is the profiler's)."""
from __future__ import annotations

from pathlib import Path

import click

from agentcg.units import parse_duration, parse_size


@click.command("profile", context_settings={"allow_interspersed_args": False})
@click.option("-o", "--output", type=click.Path(path_type=Path),
              help="Trace to write (a new directory; default agentcg-profile-<date>-<time>).")
@click.option("--sandbox", help="Sandbox name (default: profile-<program>-<pid>); must not exist yet.")
@click.option("--interval", default="100ms", show_default=True, help="Sampling interval (10ms .. 60s).")
@click.option("--root", default="agentcg", envvar="AGENTCG_ROOT", show_default=True,
              help="cgroup root below each hierarchy (env AGENTCG_ROOT).")
@click.option("--state-dir", type=click.Path(file_okay=False, path_type=Path), envvar="AGENTCG_STATE_DIR",
              help="Owner files and locks (default /run/agentcg; env AGENTCG_STATE_DIR).")
@click.option("--memory-max", help="memory.max of the sandbox (e.g. 512MB); default: no limit.")
@click.option("--llm-record", type=click.Path(dir_okay=False, path_type=Path),
              help="LLM record file the agent appends to (JSON lines; docs/profiling.md). Default: a private "
                   "temporary file; the agent finds the path in $AGENTCG_LLM_RECORD either way.")
@click.option("--daemon-socket", type=click.Path(dir_okay=False, path_type=Path),
              help="Read policy actions, KV directives and engine LLM requests for the sandbox from this daemon "
                   "(default: $AGENTCG_SOCKET or /run/agentcg/agentcg.sock when it exists).")
@click.option("--no-daemon", is_flag=True, help="Do not use the daemon even when its socket exists.")
@click.option("--memory-budget", help="With a daemon: the sandbox's memory budget there (its policy throttles, "
                                      "freezes and kills the calls begun through it near the budget).")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
def profile(output: Path | None, sandbox: str | None, interval: str, root: str, state_dir: Path | None,
            memory_max: str | None, llm_record: Path | None, daemon_socket: Path | None, no_daemon: bool,
            memory_budget: str | None, command: tuple[str, ...]) -> None:
    """Run COMMAND (an agent, or any command) as a sandbox session and record it as a trace.

    Every command it starts as a direct child (shells, developer tools, coreutils) becomes a
    tool call in its own cgroup, detected by eBPF at exec (about 1-2 s to load the programs).
    The sandbox and each running call are sampled every --interval: memory, CPU, PSI, and
    GPU memory per process when NVML sees a GPU. OOM kills and reclaim stalls (eBPF), the
    daemon's actions on the sandbox, KV directives and LLM requests (from an engine attached
    to the daemon, or the LLM record file) go into the trace's events and llm_requests. The
    trace is written when COMMAND ends, or on Ctrl-C / SIGTERM (nothing recorded is lost);
    `agentcg report TRACE` characterises it. A status line shows on stderr when it is a
    terminal; otherwise one summary line. The exit code is COMMAND's (128+N for a signal).
    """
    from agentcg.controller.profile_session import (
        SourceOptions, check_interval, default_trace_path, profile_command)
    from agentcg.errors import InvalidInput

    interval_s = check_interval(parse_duration(interval, what="--interval"))
    if no_daemon and daemon_socket is not None:
        raise InvalidInput("--no-daemon and --daemon-socket contradict each other; pass one")
    limit = parse_size(memory_max, what="--memory-max") if memory_max is not None else None
    if limit is not None and limit < 4096 * 256:
        raise InvalidInput(f"--memory-max {memory_max}: below 1 MiB, nothing could run in the sandbox")
    budget = parse_size(memory_budget, what="--memory-budget") if memory_budget is not None else None
    if budget is not None and no_daemon:
        raise InvalidInput("--memory-budget is the daemon's budget for the sandbox; it needs the daemon, "
                           "not --no-daemon (--memory-max limits the sandbox without one)")
    sources = SourceOptions(memory_max_bytes=limit, memory_budget_bytes=budget, llm_record=llm_record,
                            daemon_socket=False if no_daemon else daemon_socket)
    summary = profile_command(list(command), output if output is not None else default_trace_path(),
                              sandbox=sandbox, interval_s=interval_s, root=root, state=state_dir, sources=sources)
    if summary.returncode:
        click.get_current_context().exit(summary.returncode)
