"""`agentcg sandbox create|exec|list|rm` and `agentcg reap` (local: root, no daemon needed;
`sandbox exec` goes through the daemon when one runs, see sandbox_exec_daemon.py)."""
from __future__ import annotations

import json
import os
import signal as signals
import sys
import time
from pathlib import Path
from typing import Any

import click

from agentcg.controller.run_cli import FORWARDED_SIGNALS, common_options, emit_record
from agentcg.records import shell_exit_code


def _tree(root: str, state: Path | None = None) -> Any:
    from agentcg.controller.cgroup import open_tree
    from agentcg.controller.reaper import reap_orphans

    tree = open_tree(root=root)
    reap_orphans(tree, state)   # the next agentcg start reaps what killed owners left
    return tree


def _root_option(f: Any) -> Any:
    return click.option("--root", default="agentcg", envvar="AGENTCG_ROOT", show_default=True,
                        help="cgroup root below each hierarchy (env AGENTCG_ROOT).")(f)


@click.group()
def sandbox() -> None:
    """Sandboxes: <root>/<name>/agent for the agent, <root>/<name>/tools/<call-id> per tool call."""


@sandbox.command()
@click.argument("name")
@click.option("--priority", default=None, help="high, normal or low (CPU weight 400/100/25).")
@_root_option
def create(name: str, priority: str | None, root: str) -> None:
    """Create sandbox NAME (no error if it exists)."""
    from agentcg.controller.sandbox import (
        clear_auto_created, ensure_sandbox, parse_priority, sandbox_lock, validate_name,
    )

    validate_name(name)
    if priority is not None:
        parse_priority(priority)
    tree = _tree(root)
    with sandbox_lock(tree, name):
        clear_auto_created(tree, name)   # made on purpose: it outlives its tool calls
        created = ensure_sandbox(tree, name, priority)
    click.echo(f"{'created' if created else 'exists'}: {tree.cgroup_dir(name)}")


@sandbox.command(name="list")
@click.option("--json", "as_json", is_flag=True)
@_root_option
def list_(as_json: bool, root: str) -> None:
    """List sandboxes with their agent processes and running tool calls."""
    from agentcg.controller.sandbox import list_sandboxes

    infos = list_sandboxes(_tree(root))
    if as_json:
        click.echo(json.dumps([{"name": i.name, "cgroup_id": i.cgroup_id, "agent_pids": list(i.agent_pids),
                                "calls": list(i.calls)} for i in infos]))
        return
    for i in infos:
        click.echo(f"{i.name}\tagent pids: {len(i.agent_pids)}\ttool calls: {len(i.calls)}")


@sandbox.command()
@click.argument("name")
@_root_option
def rm(name: str, root: str) -> None:
    """Remove sandbox NAME: kills its agent and tool calls."""
    from agentcg.controller.sandbox import clear_auto_created, remove_sandbox, sandbox_lock, validate_name

    validate_name(name)
    tree = _tree(root)
    with sandbox_lock(tree, name):
        remove_sandbox(tree, name)
        clear_auto_created(tree, name)
    click.echo(f"removed: {name}")


@sandbox.command(name="exec")
@click.argument("name")
@click.option("--tools", "tools", default=None,
              help="Comma-separated globs of program names that count as tool calls (default: shells, "
                   "developer tools and coreutils; see docs/toolcalls.md).")
@click.option("--exclude", default="", help="Comma-separated globs never counted as tool calls.")
@click.option("--no-detect", is_flag=True, help="Only run CMD in the agent cgroup; no tool-call detection.")
@common_options
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
def exec_(name: str, tools: str | None, exclude: str, no_detect: bool, records: Path | None, root: str,
          state_dir: Path | None, grace: str | None, as_json: bool, no_ebpf: bool, command: tuple[str, ...]) -> None:
    """Run CMD (an agent or a shell) in sandbox NAME's agent cgroup; each command it starts
    as a direct child becomes a tool call with its own cgroup and record (needs eBPF).
    Exits with CMD's exit status. With the daemon running, the daemon detects the commands
    (they are its tool calls: policy, metrics, records); otherwise this process does."""
    from agentcg.controller.autodetect import DEFAULT_TOOL_GLOBS, ToolMatcher, parse_globs
    from agentcg.controller.sandbox import validate_name
    from agentcg.units import parse_duration

    from agentcg.controller.client import socket_path
    from agentcg.controller.sandbox_exec_daemon import exec_via_daemon

    validate_name(name)
    matcher = ToolMatcher(parse_globs(tools) if tools is not None else DEFAULT_TOOL_GLOBS, parse_globs(exclude))
    detect = not (no_detect or no_ebpf)
    if socket_path().exists():
        returncode = exec_via_daemon(name, list(command), matcher=matcher if detect else None, records=records,
                                     grace_s=parse_duration(grace, what="--grace") if grace is not None else None)
        sys.exit(shell_exit_code(returncode))
    grace_s = parse_duration(grace if grace is not None else "5s", what="--grace")
    returncode = exec_in_sandbox(name, list(command), root=root, state=state_dir, records_path=records,
                                 grace_s=grace_s, matcher=matcher if detect else None,
                                 on_record=lambda r: emit_record(r, as_json))
    sys.exit(shell_exit_code(returncode))


def exec_in_sandbox(name: str, argv: list[str], *, root: str = "agentcg", state: Path | None = None,
                    records_path: Path | None = None, grace_s: float = 5.0, matcher: Any = None,
                    on_record: Any = None) -> int:
    """Spawn argv into <name>/agent and, with a matcher, turn its commands into tool calls
    until it exits. Returns its Popen-style returncode."""
    from agentcg.controller.autodetect import ExecDetector
    from agentcg.controller.sandbox import agent_path
    from agentcg.controller.toolcall import ToolCallManager

    tree = _tree(root, state)
    monitor = None
    if matcher is not None:
        from agentcg.bpf.monitor import CONCERNS, BpfMonitor
        # exit_codes: the agent reaps its commands, so their exit status comes from eBPF
        monitor = BpfMonitor(concerns=CONCERNS + ("exit_codes",))
    mgr = ToolCallManager(tree, monitor=monitor, records_path=records_path, grace_s=grace_s, state=state)
    created = mgr.ensure_sandbox(name)
    detector = None
    try:
        if monitor is not None:
            # pid unknown until spawned; the detector only needs it for events after the spawn
            detector = ExecDetector(mgr, monitor, name, agent_pid=0, matcher=matcher, on_record=on_record)
            detector.prepare()
        try:
            agent = tree.spawn(agent_path(name), argv)
        except FileNotFoundError:
            click.echo(f"agentcg: {argv[0]}: command not found", err=True)
            return 127
        if detector is not None:
            detector.agent_pid = agent.pid
        previous = {s: signals.signal(s, lambda signum, _f: _kill_quiet(agent.pid, signum))
                    for s in FORWARDED_SIGNALS}
        try:
            while True:
                returncode = agent.poll()
                if returncode is not None:
                    break
                if detector is not None:
                    detector.step()
                else:
                    time.sleep(0.05)
        finally:
            for s, handler in previous.items():
                signals.signal(s, handler)
        if detector is not None:
            detector.agent_exited(returncode)
            detector.close()
            detector = None
        return returncode
    finally:
        if detector is not None:
            detector.close(grace_s=0.0)
        mgr.close()
        if created:
            from agentcg.controller.sandbox import remove_sandbox, sandbox_lock
            with sandbox_lock(tree, name, mgr.state):
                if tree.exists(name):
                    remove_sandbox(tree, name)   # we made it for this agent: its leftovers go too
        if monitor is not None:
            monitor.close()


def _kill_quiet(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass


from agentcg.controller.container_cli import adopt, adopt_pods, release  # noqa: E402  (docs/containers.md)

for _command in (adopt, release, adopt_pods):
    sandbox.add_command(_command)


@click.command()
@_root_option
@click.option("--state-dir", type=click.Path(file_okay=False, path_type=Path), envvar="AGENTCG_STATE_DIR")
def reap(root: str, state_dir: Path | None) -> None:
    """Kill and remove the tool-call cgroups whose owner process died."""
    from agentcg.controller.cgroup import open_tree
    from agentcg.controller.reaper import reap_orphans

    for r in reap_orphans(open_tree(root=root), state_dir):
        click.echo(f"reaped {r.sandbox}/{r.call_id} (owner pid {r.owner_pid} is gone)"
                   f"{'; removed sandbox ' + r.sandbox if r.sandbox_removed else ''}")
