"""`agentcg daemon [--config FILE]`: the long-running root daemon (controller/daemon/)."""
from __future__ import annotations

import json
import logging
import sys

import click


@click.command("daemon")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None,
              help="TOML config file; without it every default applies (see docs/daemon.md).")
@click.option("--print-config", is_flag=True, help="Validate the configuration, print it as JSON and exit.")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default="info",
              show_default=True)
def daemon(config_path: str | None, print_config: bool, log_level: str) -> None:
    """Run the root daemon: the socket API (docs/daemon-protocol.md), eBPF, PSI triggers,
    the policy tick and Prometheus /metrics. Adopts the sandboxes and running tool calls of
    an earlier daemon on start; SIGTERM leaves them running for the next one."""
    from agentcg.controller.daemon.config import load_config

    config = load_config(config_path)
    if print_config:
        click.echo(json.dumps(config.to_dict(), indent=2, sort_keys=True))
        return
    logging.basicConfig(stream=sys.stderr, level=getattr(logging, log_level.upper()),
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    from agentcg.controller.daemon.service import Daemon

    Daemon(config).run()
