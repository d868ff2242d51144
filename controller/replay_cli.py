"""`agentcg replay`: replay recorded sessions on this host's cgroups under a policy."""
from __future__ import annotations

import json
import secrets
import signal
import sys
from typing import Any

import click

from agentcg.units import format_bytes, parse_duration, parse_size


def _default_source() -> str:
    from agentcg.profiler.importers.agentcgroup import default_dataset_dir
    return str(default_dataset_dir())


@click.command("replay")
@click.argument("source", required=False)
@click.option("--session", "sessions", multiple=True, required=True, metavar="ID[=PRIORITY]",
              help="A session to replay (repeat); PRIORITY is low, normal (default) or high.")
@click.option("--policy", type=click.Choice(["agentcg", "static", "none"]), default="agentcg", show_default=True,
              help="static: each sandbox capped at budget/N; none: only the kernel acts.")
@click.option("--budget", default=None, metavar="SIZE", help="Host memory budget (memory.max of the replay's parent cgroup), e.g. 3GiB.")
@click.option("--speed", type=float, default=20.0, show_default=True, help="Time compression.")
@click.option("--tick", default="50ms", show_default=True, help="Policy period.")
@click.option("--grace", default="2s", show_default=True, help="How long a frozen call may wait for the pressure to pass.")
@click.option("--cpu-scale", type=float, default=1.0, show_default=True, help="CPU burnt, relative to the recorded utilisation.")
@click.option("--mem-scale", type=float, default=1.0, show_default=True, help="Memory allocated, relative to the recording.")
@click.option("--hints/--no-hints", default=False, show_default=True,
              help="Give each call its recorded peak as a memory hint (an oracle) for admission.")
@click.option("--compare/--no-compare", default=False, show_default=True,
              help="First replay once unconstrained (policy none, no budget) and report completion against it.")
@click.option("--dry-run", is_flag=True, help="Decide but write no policy action (the budget is still set).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.option("--cgroup-root", default=None, metavar="NAME",
              help="Top-level cgroup to create and remove (default agentcg-replay-<random>).")
def replay(source: str | None, sessions: tuple[str, ...], policy: str, budget: str | None, speed: float, tick: str,
           grace: str, cpu_scale: float, mem_scale: float, hints: bool, compare: bool, dry_run: bool,
           as_json: bool, cgroup_root: str | None) -> None:
    """Replay recorded sessions (an agentcg trace, or the AgentCgroup dataset directory;
    default: the shared agentcgroup-swe-local) with one sandbox per session and one real
    process per tool call. Needs root and a cgroup tree (see `agentcg doctor`)."""
    from agentcg.controller.replay import ReplayConfig
    from agentcg.controller.replay_session import load_trace, parse_session_choice, plan_sessions

    choices = [parse_session_choice(text) for text in sessions]
    budget_bytes = parse_size(budget, what="--budget") if budget else None
    config = ReplayConfig(policy=policy, budget_bytes=budget_bytes, tick_s=parse_duration(tick, what="--tick"),
                          grace_s=parse_duration(grace, what="--grace"), hints=hints, dry_run=dry_run)
    trace = load_trace(source or _default_source(), [c.session_id for c in choices])
    plans = plan_sessions(trace, choices, speed=speed, cpu_scale=cpu_scale, mem_scale=mem_scale)
    reference = None
    root = cgroup_root or f"agentcg-replay-{secrets.token_hex(4)}"
    with _terminate_cleanly():
        if compare:
            reference = _run(plans, ReplayConfig(policy="none", tick_s=config.tick_s), root)
        result = _run(plans, config, root)
    if as_json:
        data = result.to_dict()
        if reference is not None:
            data["reference"] = {s.session_id: s.completion_s for s in reference.sessions}
        click.echo(json.dumps(data, indent=1, sort_keys=True))
    else:
        click.echo(render(result, reference))


def _run(plans, config, root: str):
    from agentcg.controller.cgroup import open_tree
    from agentcg.controller.replay import Replay

    tree = open_tree(root=root)
    if tree.exists(""):
        from agentcg.errors import CgroupExists
        raise CgroupExists(f"cgroup root {root!r} already exists; name a new one with --cgroup-root")
    try:
        return Replay(tree, plans, config).run()
    finally:
        if tree.exists(""):
            tree.remove("", timeout_s=10.0)


class _terminate_cleanly:
    """SIGTERM and SIGHUP unwind like Ctrl-C, so the replay's cgroups and processes go."""

    def __enter__(self) -> None:
        self.saved = {sig: signal.signal(sig, self._raise) for sig in (signal.SIGTERM, signal.SIGHUP)}

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self.saved.items():
            signal.signal(sig, handler)

    @staticmethod
    def _raise(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt


def render(result, reference=None) -> str:
    ref = {s.session_id: s.completion_s for s in reference.sessions} if reference else {}
    budget = format_bytes(result.budget_bytes) if result.budget_bytes else "none"
    lines = [f"policy {result.policy}, budget {budget}, speed {result.speed:g}x, {result.layout} cgroups, "
             f"{result.wall_s:.1f} s" + (" (TIMED OUT)" if result.timed_out else "")]
    lines.append(f"{'session':<44} {'prio':<6} {'result':<8} {'done_s':>7} {'ref_s':>7} {'calls':>5} "
                 f"{'oom':>4} {'killed':>6} {'peak':>10}")
    for s in result.sessions:
        done = f"{s.completion_s:.1f}" if s.completion_s is not None else "-"
        base = ref.get(s.session_id)
        lines.append(f"{s.session_id[:44]:<44} {s.priority:<6} {'survived' if s.survived else 'LOST':<8} {done:>7} "
                     f"{(f'{base:.1f}' if base else '-'):>7} {s.calls:>5} {s.oom_killed:>4} {s.policy_killed:>6} "
                     f"{format_bytes(s.peak_bytes):>10}")
    used = f"host peak {format_bytes(result.host_peak_bytes)}, mean {format_bytes(result.host_mean_bytes)}"
    if result.budget_bytes:
        used += (f" ({result.host_peak_bytes / result.budget_bytes:.0%} and "
                 f"{result.host_mean_bytes / result.budget_bytes:.0%} of the budget)")
    lines.append(used)
    lines.append(f"OOM kills {result.oom_kills}, tool calls killed {result.calls_killed}, actions "
                 + (", ".join(f"{k} {v}" for k, v in sorted(result.actions.items())) or "none"))
    for note in result.degraded[:3]:
        lines.append(f"degraded: {note}")
    for call in result.calls:
        if call.message and call.outcome == "policy_killed":
            lines.append(f"message to the agent: {call.message}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(replay())
