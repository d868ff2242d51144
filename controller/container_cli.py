"""`agentcg sandbox adopt NAME --container ID | --pid PID | --cgroup PATH` and
`agentcg sandbox release NAME`: containers as sandboxes, through the daemon (it keeps
watching the container's execs; see docs/containers.md)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click


def _client(socket: Path | None) -> Any:
    from agentcg.controller.client import Client

    return Client(mode="daemon", socket=socket)


def _socket_option(f: Any) -> Any:
    return click.option("--socket", type=click.Path(dir_okay=False, path_type=Path), envvar="AGENTCG_SOCKET",
                        default=None, help="The daemon's socket (env AGENTCG_SOCKET).")(f)


@click.command()
@click.argument("name")
@click.option("--container", "container", default=None, help="Docker/Podman container id (or prefix) or name.")
@click.option("--runtime", type=click.Choice(["podman", "docker"]), default=None,
              help="Which CLI resolves --container (default: podman, then docker).")
@click.option("--pid", type=int, default=None, help="The container's init process on the host.")
@click.option("--cgroup", "cgroup", default=None,
              help="The cgroup path below the v2 mount (Kubernetes pods, systemd units, other runtimes).")
@click.option("--memory-budget", default=None, help="The sandbox's budget for the policy (default: the "
                                                      "container's own memory limit), e.g. 2G.")
@click.option("--priority", default="normal", show_default=True, help="high, normal or low.")
@click.option("--tools", default=None, help="Globs of the agent's commands that count as tool calls (default: "
                                            "shells, developer tools, coreutils); every exec from outside counts.")
@click.option("--exclude", default=None, help="Globs of the agent's commands that never count.")
@click.option("--json", "as_json", is_flag=True)
@_socket_option
def adopt(name: str, container: str | None, runtime: str | None, pid: int | None, cgroup: str | None,
          memory_budget: str | None, priority: str, tools: str | None, exclude: str | None, as_json: bool,
          socket: Path | None) -> None:
    """Make a running container sandbox NAME: its processes go to NAME/agent, every
    `podman exec`/`docker exec` and every command its agent starts becomes a tool call."""
    from agentcg.controller.sandbox import parse_priority, validate_name
    from agentcg.errors import InvalidInput
    from agentcg.units import parse_size

    validate_name(name)
    parse_priority(priority)
    if sum(x is not None for x in (container, pid, cgroup)) != 1:
        raise InvalidInput("give exactly one of --container ID, --pid PID or --cgroup PATH")
    if runtime is not None and container is None:
        raise InvalidInput("--runtime goes with --container")
    args: dict[str, Any] = {"name": name, "priority": priority}
    if tools is not None:
        args["tools"] = tools
    if exclude is not None:
        args["exclude"] = exclude
    if memory_budget is not None:
        args["memory_budget_bytes"] = parse_size(memory_budget, what="--memory-budget")
    if container is not None:
        from agentcg.controller.container import inspect_container
        # resolved here, not in the daemon: the runtime's CLI must not stall the daemon's loop
        info = inspect_container(container, runtime)
        args.update(pid=info.pid, runtime=info.runtime, container_id=info.container_id)
    elif pid is not None:
        args["pid"] = pid
    else:
        args["cgroup"] = cgroup
    result = _client(socket).request("sandbox.adopt", args)
    if as_json:
        click.echo(json.dumps(result))
        return
    adopted = result.get("adopted", {})
    budget = result.get("memory_budget_bytes")
    click.echo(f"adopted: {name} = {adopted.get('runtime')} {str(adopted.get('container_id') or '')[:12]} "
               f"({adopted.get('cgroup')}), budget {budget if budget is not None else 'none'} "
               f"({adopted.get('budget_from')})")


@click.command()
@click.argument("name")
@_socket_option
def release(name: str, socket: Path | None) -> None:
    """Give sandbox NAME's container back: its processes return to the container's cgroup,
    agentcg's leaves are removed; the container keeps running."""
    from agentcg.controller.sandbox import validate_name

    validate_name(name)
    result = _client(socket).request("sandbox.release", {"name": name})
    click.echo(f"released: {name} ({result.get('processes_moved_back', 0)} processes moved back)")



@click.command(name="adopt-pods")
@click.option("--label", default="agentcg.io/sandbox", show_default=True,
              help="Pods with this label are sandboxes (its value names the sandbox; else the pod's name).")
@click.option("--node", envvar="NODE_NAME", required=True, help="This node's name (env NODE_NAME).")
@click.option("--interval", default="10s", show_default=True, help="Time between two passes.")
@click.option("--once", is_flag=True, help="One pass, then exit.")
@_socket_option
def adopt_pods(label: str, node: str, interval: str, once: bool, socket: Path | None) -> None:
    """Kubernetes: adopt this node's pods that carry LABEL, release them when they go
    (runs beside the daemon in deploy/kubernetes; needs the pod's service account)."""
    import signal
    import threading

    from agentcg.controller.cgroup.layout import detect_layout
    from agentcg.controller.container_k8s import list_node_pods, pods_to_adopt, reconcile
    from agentcg.errors import AgentcgError
    from agentcg.units import parse_duration

    period_s = parse_duration(interval, what="--interval")
    mount = detect_layout().v2_mount
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    client, adopted = _client(socket), {}
    while not stop.is_set():
        try:
            adopted = reconcile(client, pods_to_adopt(list_node_pods(node, label), label), str(mount), adopted)
        except AgentcgError as exc:
            click.echo(f"agentcg adopt-pods: {exc}; retrying in {period_s:g} s", err=True)
        if once:
            return
        stop.wait(period_s)
