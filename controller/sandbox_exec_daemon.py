"""`agentcg sandbox exec` when the daemon runs: the daemon detects the agent's commands
(controller/daemon/exec_watch.py), this process only spawns the agent and waits for it.

    sandbox.exec_begin -> spawn the agent into the returned agent cgroup (joins before exec)
    -> wait for it, passing SIGTERM/SIGHUP/SIGINT/SIGQUIT on -> sandbox.exec_end

The agent's tool calls are the daemon's: its policy acts on them, /metrics counts them and
their records go to the daemon's records file (`--records` cannot get them here: the
client says where they are). A daemon restart while the agent runs does not stop the
agent, nor its detection: the next daemon re-establishes the watch (exec_watch.py) and
exec_end, resent with back-off, reaches it. Only when no daemon has the watch any more
(its state directory was lost) does exec_end find none, and the client says so.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from agentcg.controller.client import spawn_into
from agentcg.controller.daemon_client import DaemonLink, socket_path
from agentcg.controller.run_cli import _wait_forwarding
from agentcg.daemon_protocol import Method
from agentcg.errors import AgentcgError, CgroupGone, DaemonUnavailable
from agentcg.records import status_of


def exec_via_daemon(name: str, argv: list[str], *, matcher: Any = None, records: Path | None = None,
                    grace_s: float | None = None, link: DaemonLink | None = None) -> int:
    """Run argv as sandbox `name`'s agent with the daemon detecting its commands (a
    ToolMatcher, or None for no detection). Returns the agent's Popen-style returncode."""
    link = link or DaemonLink(socket_path())
    args: dict[str, Any] = {"sandbox": name, "detect": matcher is not None}
    if matcher is not None:
        args.update(tools=list(matcher.include), exclude=list(matcher.exclude))
    if grace_s is not None:
        args["grace_s"] = grace_s
    try:
        watch = link.request(Method.SANDBOX_EXEC_BEGIN, args, retry="unsent")
        try:
            agent = spawn_into([Path(p) for p in watch["agent_procs"]], argv)
        except FileNotFoundError:
            _say(f"{argv[0]}: command not found")
            returncode = 127
        except (PermissionError, IsADirectoryError, NotADirectoryError) as exc:
            _say(f"{argv[0]}: {exc.strerror}")
            returncode = 126
        else:
            returncode = _wait_forwarding(agent)
        _end(link, int(watch["watch_id"]), returncode, records)
        return returncode
    finally:
        link.close()


def _end(link: DaemonLink, watch_id: int, returncode: int, records: Path | None) -> None:
    exit_code, signal_number = status_of(returncode)
    end_args: dict[str, Any] = {"watch_id": watch_id}
    if exit_code is not None:
        end_args["exit_code"] = exit_code
    if signal_number is not None:
        end_args["signal"] = signal_number
    try:
        result = link.request(Method.SANDBOX_EXEC_END, end_args, retry="any")
    except (CgroupGone, DaemonUnavailable) as exc:
        _say(f"the daemon no longer watches this agent ({exc}); the calls it moved are recorded by the daemon")
        return
    except AgentcgError as exc:   # the agent ran: its status wins over the summary
        _say(f"sandbox.exec_end failed: {exc}")
        return
    where = result.get("records_path") or "the daemon's records file"
    running = f", {result.get('running')} still in their grace period" if result.get("running") else ""
    _say(f"{result.get('calls', 0)} tool call(s) through the daemon ({result.get('missed', 0)} missed{running}); "
         f"records in {where}")
    if records is not None:
        _say(f"--records {records}: with the daemon running the records are its own ({where})")


def _say(text: str) -> None:
    sys.stderr.write(f"agentcg: {text}\n")
    sys.stderr.flush()
