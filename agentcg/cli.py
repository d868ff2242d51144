"""The `agentcg` command line: one click group whose subcommands load lazily.

Each subcommand lives in the part that owns it; this module only knows where. Heavy
imports (pandas, torch, bcc) happen inside the subcommand modules, so `agentcg --help`
imports nothing but click.
"""
from __future__ import annotations

import importlib
import importlib.util
import sys

import click

# name -> (module, attribute, one-line help). The help is here so that listing the
# commands does not import them.
COMMANDS: dict[str, tuple[str, str, str]] = {
    "doctor": ("agentcg.controller.doctor_cli", "doctor", "Report what this host can do, with fixes."),
    "run": ("agentcg.controller.run_cli", "run", "Run one command as a tool call in its own cgroup."),
    "sandbox": ("agentcg.controller.sandbox_cli", "sandbox", "Create, list, enter and remove sandboxes."),
    "reap": ("agentcg.controller.sandbox_cli", "reap", "Remove cgroups left by dead agentcg processes."),
    "daemon": ("agentcg.controller.daemon_cli", "daemon", "Run the root policy daemon."),
    "replay": ("agentcg.controller.replay_cli", "replay", "Replay recorded sessions on the real kernel."),
    "profile": ("agentcg.controller.profile_cli", "profile", "Record a whole agent session as a trace."),
    "report": ("agentcg.profiler.cli", "report", "Characterise recorded sessions: time, memory, tool calls."),
    "import": ("agentcg.profiler.cli", "import_trace", "Convert external traces into agentcg traces."),
    "kv": ("agentcg.kv_cli", "kv", "Simulate KV-cache policies on recorded sessions."),
    "gpu": ("agentcg.gpu.cli", "gpu", "GPU sampling and KV-store benchmarks."),
    "demo": ("agentcg.demo", "demo", "Doctor plus a short profiled demo session."),
}


def _available(name: str) -> bool:
    module = COMMANDS[name][0]
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(name for name in COMMANDS if _available(name))

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS or not _available(name):
            return None
        module_name, attribute, _ = COMMANDS[name]
        return getattr(importlib.import_module(module_name), attribute)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(name, COMMANDS[name][2]) for name in self.list_commands(ctx)]
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="agentcg")
def cli() -> None:
    """agentcg: cgroups per agent tool call, eBPF profiling, and KV-cache policies."""


def main(argv: list[str] | None = None) -> int:
    from agentcg.errors import AgentcgError

    try:
        # Without standalone mode click returns ctx.exit(code)'s code instead of exiting.
        returned = cli.main(args=argv, prog_name="agentcg", standalone_mode=False)
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except click.Abort:
        click.echo("agentcg: aborted", err=True)
        return 130
    except AgentcgError as exc:
        click.echo(f"agentcg: error: {exc}", err=True)
        return exc.exit_code
    except KeyboardInterrupt:
        click.echo("agentcg: interrupted", err=True)
        return 130
    return returned if isinstance(returned, int) and not isinstance(returned, bool) else 0


if __name__ == "__main__":
    sys.exit(main())
