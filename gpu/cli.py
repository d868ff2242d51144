"""`agentcg gpu`: watch GPUs through NVML, benchmark the tiered KV store, count CUDA copies."""
from __future__ import annotations

import dataclasses
import json
import signal
import sys
import threading
from pathlib import Path

import click

from agentcg.errors import AgentcgError, InvalidInput
from agentcg.units import format_bytes, parse_duration, parse_size


@click.group()
def gpu() -> None:
    """GPU sampling (NVML), KV-store benchmark, CUDA copy tracing."""


def _stop_event() -> threading.Event:
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    return stop


def _line(sample) -> str:
    util = "-" if sample.utilization_gpu_ratio is None else f"{sample.utilization_gpu_ratio:.0%}"
    pcie = "pcie n/a"
    if sample.pcie_tx_bytes_per_s is not None:
        pcie = (f"pcie tx {format_bytes(sample.pcie_tx_bytes_per_s)}/s rx "
                f"{format_bytes(sample.pcie_rx_bytes_per_s)}/s ({sample.pcie_source})")
    procs = ", ".join(f"{p.pid}={p.owner}:{'?' if p.used_memory_bytes is None else format_bytes(p.used_memory_bytes)}"
                      for p in sample.processes)
    return (f"gpu{sample.index} {sample.name}: mem {format_bytes(sample.memory_used_bytes)}/"
            f"{format_bytes(sample.memory_total_bytes)} util {util} {pcie}" + (f" procs {procs}" if procs else ""))


@gpu.command()
@click.option("--interval", default="1s", show_default=True, help="Sampling period, e.g. 100ms.")
@click.option("--count", type=int, default=0, help="Stop after this many samples (0: until Ctrl-C).")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per GPU and sample.")
@click.option("--allow-missing", is_flag=True, help="Exit 0 (after saying so) when there is no NVML or GPU.")
def watch(interval: str, count: int, as_json: bool, allow_missing: bool) -> None:
    """Sample memory, utilisation, PCIe bytes and per-process GPU memory by owner."""
    from agentcg.gpu.nvml import NvmlMissing, NvmlSampler

    interval_s = parse_duration(interval, what="--interval")
    if interval_s < 0.01:
        raise InvalidInput(f"--interval: at least 10ms, got {interval}")
    if count < 0:
        raise InvalidInput(f"--count: must be 0 or more, got {count}")
    sampler = NvmlSampler()
    try:
        sampler.open()
    except NvmlMissing as exc:
        if allow_missing:
            click.echo(f"agentcg: gpu watch: {exc}; nothing to sample")
            return
        raise
    stop = _stop_event()
    taken = 0
    try:
        while not stop.is_set():
            for sample in sampler.sample():
                click.echo(json.dumps(dataclasses.asdict(sample), sort_keys=True) if as_json else _line(sample))
            sys.stdout.flush()
            taken += 1
            if count and taken >= count:
                break
            stop.wait(interval_s)
    finally:
        sampler.close()


def _sizes(text: str) -> tuple[int, ...]:
    sizes = tuple(parse_size(part, what="--block-sizes") for part in text.split(",") if part.strip())
    if not sizes or any(s <= 0 for s in sizes):
        raise InvalidInput(f"--block-sizes: expected a comma-separated list such as 64K,1M, got {text!r}")
    return sizes


@gpu.command()
@click.option("--ssd-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Directory for the SSD tier (default: a temp dir on the repository's filesystem).")
@click.option("--block-sizes", default="16K,64K,256K,1M,4M", show_default=True)
@click.option("--total", default="256M", show_default=True, help="Bytes moved per operation.")
@click.option("--repeats", type=int, default=7, show_default=True,
              help="Store moves per row, each paired with its own ceiling run; the ratio is their median.")
@click.option("--device", type=click.Choice(["auto", "cuda", "cpu"]), default="auto", show_default=True)
@click.option("--output", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write the report to this file.")
@click.option("--kernel-view/--no-kernel-view", default=True, show_default=True,
              help="Also compare the store's SSD bytes with the block I/O BPF charged to its cgroup.")
@click.option("--fail-on-miss", is_flag=True, help="Say NOT met and exit 1 when a row misses its target ratio.")
def bench(ssd_dir: Path | None, block_sizes: str, total: str, repeats: int, device: str, output: Path | None,
          kernel_view: bool, fail_on_miss: bool) -> None:
    """Measure copy and SSD ceilings and the KV store's swap/offload/load bandwidth beside them."""
    from agentcg.gpu.bench import format_result, run_bench

    result = run_bench(ssd_dir, _sizes(block_sizes), parse_size(total, what="--total"), repeats, device,
                       progress=lambda msg: click.echo(f"  ... {msg}", err=True), kernel_view=kernel_view)
    text = format_result(result)
    click.echo(text)
    if output is not None:
        from agentcg.safefile import atomic_write   # root writes it: never through a planted link
        atomic_write(output, text + "\n", 0o644)
    if not result.integrity_ok:
        raise AgentcgError("gpu bench: data read back differs from data written (see the notes above)")
    missed = sum(r.meets_target is False for r in result.rows)
    rated = sum(r.meets_target is not None for r in result.rows)
    click.echo(f"targets: NOT met ({missed} of {rated} rows below their ratio)" if missed else "targets: met")
    if missed and fail_on_miss:
        raise SystemExit(1)


@gpu.command()
@click.option("--pid", type=int, required=True, help="Process to trace (e.g. a vLLM worker).")
@click.option("--duration", default="10s", show_default=True)
@click.option("--libcudart", type=click.Path(dir_okay=False), default=None, help="Override the libcudart path.")
@click.option("--libcuda", type=click.Path(dir_okay=False), default=None, help="Override the libcuda path.")
def copies(pid: int, duration: str, libcudart: str | None, libcuda: str | None) -> None:
    """Count a process's CUDA memcpy calls and bytes by direction (uprobes)."""
    from agentcg.bpf.cudacopy import CudaCopyTracer

    duration_s = parse_duration(duration, what="--duration")
    stop = _stop_event()
    with CudaCopyTracer(pid, libcudart=libcudart, libcuda=libcuda) as tracer:
        for name, path in tracer.libraries.items():
            click.echo(f"{name}: {path}")
        stop.wait(duration_s)
        counters = tracer.counters()
    for api, directions in sorted(counters.by_api.items()):
        for direction, totals in sorted(directions.items()):
            click.echo(f"{api:<22} {direction:<17} {totals.calls:>10} calls {format_bytes(totals.bytes):>11}")
    click.echo(f"total host_to_device {format_bytes(counters.host_to_device_bytes)}, "
               f"device_to_host {format_bytes(counters.device_to_host_bytes)}")
