"""`agentcg kv`: KV-cache policy tools. `agentcg kv simulate` compares policies on
recorded sessions against a cost model of the engine (docs/kv-policies.md)."""
from __future__ import annotations

import click

from agentcg.errors import InvalidInput
from agentcg.units import parse_duration, parse_size


@click.group("kv")
def kv() -> None:
    """KV-cache policies: simulate them on recorded agent sessions."""


@kv.command("simulate")
@click.argument("source", required=False, type=click.Path(exists=True))
@click.option("--policies", default="vllm-v1,infercept,continuum,agentcg", show_default=True,
              help="Comma-separated: vllm-v1, infercept, continuum, continuum-paper, agentcg.")
@click.option("--gpu", default="h200", show_default=True, help="Cost-model preset: h200, h100, a100, l40s.")
@click.option("--cost-model", "cost_model", type=click.Path(exists=True, dir_okay=False),
              help="Measured cost model (JSON, e.g. from `agentcg gpu bench`); replaces --gpu.")
@click.option("--gpu-kv", help="GPU KV capacity (e.g. 80GiB). Default: --gpu-kv-fraction of the sessions' contexts.")
@click.option("--gpu-kv-fraction", type=float, default=0.5, show_default=True,
              help="GPU KV capacity as a fraction of the sum of the sessions' mean contexts.")
@click.option("--host-memory", default="256GiB", show_default=True, help="Host memory budget for KV and sandboxes.")
@click.option("--ssd", default="2TiB", show_default=True, help="SSD capacity for KV (0 for none).")
@click.option("--arrival-interval", default="0", show_default=True, help="Time between session starts.")
@click.option("--limit", type=int, help="Simulate only the first N sessions.")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
@click.option("--real", is_flag=True, help="Run the reference engine (scaled-down sessions) instead of the cost model.")
@click.option("--real-max-context", type=int, default=512, show_default=True,
              help="--real: scale contexts so the longest has this many tokens.")
@click.option("--real-max-output", type=int, default=8, show_default=True, help="--real: cap on output tokens per call.")
@click.option("--real-time-scale", type=float, default=0.01, show_default=True, help="--real: factor on tool gaps.")
def simulate(source, policies, gpu, cost_model, gpu_kv, gpu_kv_fraction, host_memory, ssd,
             arrival_interval, limit, as_json, real, real_max_context, real_max_output, real_time_scale) -> None:
    """Compare KV policies on SOURCE (an agentcg trace, or an AgentCgroup dataset folder;
    default: the shared agentcgroup-swe-local dataset)."""
    from agentcg.profiler.importers.agentcgroup import default_dataset_dir
    from agentcg.profiler.kvsim_cost import gpu_preset, load_engine_model
    from agentcg.profiler.kvsim_report import (build_config, compare, format_header, format_table,
                                               parse_policies, results_json)
    from agentcg.profiler.kvsim_sessions import load_sessions

    names = parse_policies(policies)
    if source is None:
        source = default_dataset_dir()
        if not source.is_dir():
            raise InvalidInput(f"no SOURCE given and the default dataset {source} is absent; pass a trace")
    model = load_engine_model(cost_model) if cost_model else gpu_preset(gpu)
    if limit is not None and limit < 1:
        raise InvalidInput(f"--limit must be at least 1, got {limit}")
    loaded = load_sessions(source)
    sessions = loaded.sessions[:limit] if limit else loaded.sessions
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
        arrival_interval_s=parse_duration(arrival_interval, what="--arrival-interval"))
    results = compare(sessions, names, config)
    if as_json:
        click.echo(results_json(results))
        return
    click.echo(format_header(sessions, config, loaded.source, loaded.imputed_durations, loaded.skipped))
    click.echo()
    click.echo(format_table(results))
