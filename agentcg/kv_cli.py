"""`agentcg kv`: KV-cache policy tools. `agentcg kv simulate` compares policies on
recorded sessions against a cost model of the engine; `agentcg kv sweep` does it over a
grid of GPU KV, arrival spacing and host budget (docs/kv-policies.md)."""
from __future__ import annotations

import click

from agentcg.errors import InvalidInput
from agentcg.units import parse_duration, parse_size


@click.group("kv")
def kv() -> None:
    """KV-cache policies: simulate them on recorded agent sessions."""


@kv.command("simulate")
@click.argument("source", required=False, type=click.Path(exists=True))
@click.option("--policies", default="vllm-v1,vllm-v1-offload,infercept,continuum,agentcg", show_default=True,
              help="Comma-separated: vllm-v1, vllm-v1-priority, vllm-v1-offload, infercept, continuum, "
                   "continuum-paper, agentcg; a name may end in :safe or :optimistic (its fixed host pool).")
@click.option("--gpu", default="h200", show_default=True, help="Cost-model preset: h200, h100, a100, l40s.")
@click.option("--cost-model", "cost_model", type=click.Path(exists=True, dir_okay=False),
              help="Measured cost model (JSON, e.g. from `agentcg gpu bench`); replaces --gpu.")
@click.option("--gpu-kv", help="GPU KV capacity (e.g. 80GiB). Default: --gpu-kv-fraction of the sessions' contexts.")
@click.option("--gpu-kv-fraction", type=float, default=0.5, show_default=True,
              help="GPU KV capacity as a fraction of the sum of the sessions' mean contexts.")
@click.option("--host-memory", default="256GiB", show_default=True, help="Host memory budget for KV and sandboxes.")
@click.option("--ssd", default="2TiB", show_default=True, help="SSD capacity for KV (0 for none).")
@click.option("--arrival-interval", default="0", show_default=True, help="Time between session starts.")
@click.option("--host-pool", type=click.Choice(["safe", "optimistic"]), default="safe", show_default=True,
              help="Fixed host KV pool of the baselines: budget - sum of sandbox peaks (safe) or means (optimistic).")
@click.option("--shared-prefix", type=int, help="Tokens of system prompt the sessions share (default: estimated).")
@click.option("--workers", type=int, default=1, show_default=True, help="Policies simulated in parallel processes.")
@click.option("--limit", type=int, help="Simulate only the first N sessions.")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
@click.option("--real", is_flag=True, help="Run the reference engine (scaled-down sessions) instead of the cost model.")
@click.option("--real-max-context", type=int, default=512, show_default=True,
              help="--real: scale contexts so the longest has this many tokens.")
@click.option("--real-max-output", type=int, default=8, show_default=True, help="--real: cap on output tokens per call.")
@click.option("--real-time-scale", type=float, default=0.01, show_default=True, help="--real: factor on tool gaps.")
def simulate(source, policies, gpu, cost_model, gpu_kv, gpu_kv_fraction, host_memory, ssd,
             arrival_interval, host_pool, shared_prefix, workers, limit, as_json, real, real_max_context,
             real_max_output, real_time_scale) -> None:
    """Compare KV policies on SOURCE (an agentcg trace, or an AgentCgroup dataset folder;
    default: the shared agentcgroup-swe-local dataset)."""
    from agentcg.profiler.kvsim_report import (build_config, compare, format_header, format_table,
                                               parse_policies, results_json)

    names = parse_policies(policies)
    if workers < 1:
        raise InvalidInput(f"--workers must be at least 1, got {workers}")
    loaded, sessions, model = _load(source, gpu, cost_model, limit)
    if real:
        from agentcg.profiler.kvsim_real import format_real, run_real

        try:
            from agentcg.gpu.engine.run import run_sessions
            from agentcg.gpu.kvgeometry import KVGeometry
        except ImportError as exc:
            raise InvalidInput(f"--real needs the reference engine (agentcg.gpu.engine), which cannot be loaded "
                               f"here ({exc}); drop --real to simulate with the cost model") from None

        if min(real_max_context, real_max_output) < 1 or real_time_scale < 0:
            raise InvalidInput("--real-max-context and --real-max-output must be at least 1, --real-time-scale >= 0")
        names = [n.partition(":")[0] for n in names]
        results = run_real(sessions, names, run_sessions, KVGeometry, gpu_kv_fraction=gpu_kv_fraction,
                           max_context_tokens=real_max_context,
                           max_output_tokens=real_max_output, time_scale=real_time_scale)
        click.echo(f"reference engine, {len(sessions)} sessions scaled to at most {real_max_context} tokens of context")
        click.echo(format_real(results))
        return
    config = build_config(
        sessions, model, gpu_kv_bytes=parse_size(gpu_kv, what="--gpu-kv") if gpu_kv else None,
        gpu_kv_fraction=gpu_kv_fraction, host_memory_bytes=parse_size(host_memory, what="--host-memory"),
        ssd_bytes=parse_size(ssd, what="--ssd"),
        arrival_interval_s=parse_duration(arrival_interval, what="--arrival-interval"),
        host_pool=host_pool, shared_prefix_tokens=shared_prefix)
    results = compare(sessions, names, config, workers=workers)
    if as_json:
        click.echo(results_json(results))
        return
    click.echo(format_header(sessions, config, loaded.source, loaded.imputed_durations, loaded.skipped))
    click.echo()
    click.echo(format_table(results))


def _load(source, gpu, cost_model, limit):
    from agentcg.profiler.importers.agentcgroup import default_dataset_dir
    from agentcg.profiler.kvsim_cost import gpu_preset, load_engine_model
    from agentcg.profiler.kvsim_sessions import load_sessions

    if source is None:
        source = default_dataset_dir()
        if not source.is_dir():
            raise InvalidInput(f"no SOURCE given and the default dataset {source} is absent; pass a trace")
    model = load_engine_model(cost_model) if cost_model else gpu_preset(gpu)
    if limit is not None and limit < 1:
        raise InvalidInput(f"--limit must be at least 1, got {limit}")
    loaded = load_sessions(source)
    return loaded, (loaded.sessions[:limit] if limit else loaded.sessions), model


def _floats(text: str, what: str, parse=float) -> tuple:
    try:
        values = tuple(parse(v.strip()) for v in text.split(",") if v.strip())
    except (ValueError, InvalidInput) as exc:
        raise InvalidInput(f"{what}: {exc}") from None
    if not values:
        raise InvalidInput(f"{what}: give at least one value")
    return values


@kv.command("sweep")
@click.argument("source", required=False, type=click.Path(exists=True))
@click.option("--gpu", default="h200", show_default=True, help="Cost-model preset: h200, h100, a100, l40s.")
@click.option("--cost-model", "cost_model", type=click.Path(exists=True, dir_okay=False),
              help="Measured cost model (JSON); replaces --gpu.")
@click.option("--fractions", default="0.25,0.5,1", show_default=True, help="GPU KV fractions of the demand.")
@click.option("--spacings", default="0,30", show_default=True, help="Session arrival spacings (seconds).")
@click.option("--budgets", default="256GiB,48GiB", show_default=True, help="Host memory budgets (all sessions).")
@click.option("--ssd", default="0", show_default=True, help="SSD capacity for KV (every policy).")
@click.option("--stride", type=int, default=1, show_default=True, help="Run every N-th session (budgets scale).")
@click.option("--workers", type=int, default=2, show_default=True, help="Simulations in parallel processes.")
@click.option("--png", "png", type=click.Path(dir_okay=False), default="kv-sweep.png", show_default=True,
              help="Where to write the heat map.")
@click.option("--limit", type=int, help="Only the first N sessions.")
def sweep_cmd(source, gpu, cost_model, fractions, spacings, budgets, ssd, stride, workers, png, limit) -> None:
    """agentcg against the best baseline over GPU KV fraction x arrival spacing x host budget."""
    from agentcg.profiler.kvsim_sweep import format_sweep, plot_sweep, sweep

    if workers < 1:
        raise InvalidInput(f"--workers must be at least 1, got {workers}")
    fr = _floats(fractions, "--fractions")
    if any(not 0 < f <= 10 for f in fr):
        raise InvalidInput(f"--fractions must be in (0, 10], got {fractions}")
    sp = _floats(spacings, "--spacings", lambda v: parse_duration(v, what="--spacings"))
    bu = _floats(budgets, "--budgets", lambda v: parse_size(v, what="--budgets"))
    loaded, sessions, model = _load(source, gpu, cost_model, limit)
    points = sweep(sessions, model, fractions=fr, spacings_s=sp, budgets=bu, stride=stride,
                   ssd_bytes=parse_size(ssd, what="--ssd"), workers=workers)
    click.echo(f"{len(sessions[::stride])} sessions (every {stride}) from {loaded.source}")
    click.echo(format_sweep(points))
    click.echo(f"heat map: {plot_sweep(points, png)}")
