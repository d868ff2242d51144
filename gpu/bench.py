"""`agentcg gpu bench`: the KV store's achieved bandwidth beside the ceilings, in one run.

For each block size and two layouts, one store with room for `total_bytes` is filled and
moved device -> host -> device -> SSD -> device, `repeats` times; each move is timed from
submission to `wait()` returning. Layouts: contiguous (the request's blocks on consecutive
slots) and scattered (on every other device slot, as a paged engine such as vLLM leaves
its block pool after churn). Beside each move its ceiling is measured on the same memory
and the same number of bytes, by a different method than the store's own:
  swap_out / swap_in   CPU tier: a plain libc memcpy loop of 1 MiB pieces between the
                       pools (mlocked); CUDA: one pinned torch copy_ of all the bytes;
  offload / load       fio-like sequential I/O of a separate file on the SSD tier's
                       filesystem: 16 MiB requests, queue depth 1, O_DIRECT (or
                       buffered+fdatasync+fadvise, as the tier), from one aligned buffer.
With CUDA the pageable-memory copies are measured too, for reference. Figures are medians
over the repeats; ratio = store / ceiling. Integrity is checked once per block size.
"""
from __future__ import annotations

import ctypes
import os
import platform
import statistics
import tempfile
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from agentcg.errors import InvalidInput
from agentcg.gpu.hostmem import HostRegion
from agentcg.gpu.kvgeometry import KVGeometry
from agentcg.gpu.kvstore import TieredKVStore
from agentcg.procfs import PROC
from agentcg.units import format_bytes

DEFAULT_BLOCK_SIZES = (16 * 2**10, 64 * 2**10, 256 * 2**10, 2**20, 4 * 2**20)
DEFAULT_TOTAL_BYTES = 256 * 2**20
SWAP_TARGET, SWAP_TARGET_MIN_BLOCK = 0.90, 64 * 2**10
SSD_TARGET = 0.80
SCATTERED_TARGET = 0.80      # every op, scattered layout (16 KiB blocks moved at 0.07-0.12 before)
CEILING_PIECE_BYTES = 2**20  # memcpy piece
CEILING_IO_BYTES = 16 * 2**20  # fio-like request size (--bs=16M: the largest one I/O the store issues)
KERNEL_VIEW_BYTES = 64 * 2**20
LAYOUTS = ("contiguous", "scattered")


@dataclass(frozen=True)
class BenchRow:
    op: str
    block_bytes: int
    bytes: int
    store_bytes_per_s: float       # median over the repetitions
    ceiling: str
    ceiling_bytes_per_s: float     # median over the repetitions
    target_ratio: float | None
    layout: str = "contiguous"
    ratios: tuple[float, ...] = ()  # per repetition: ceiling time / store time of one adjacent pair

    @property
    def ratio(self) -> float:
        """The median of the paired ratios (each store move against its own ceiling run)."""
        if self.ratios:
            return statistics.median(self.ratios)
        return self.store_bytes_per_s / self.ceiling_bytes_per_s

    @property
    def spread(self) -> tuple[float, float]:
        """Lowest and highest paired ratio."""
        return (min(self.ratios), max(self.ratios)) if self.ratios else (self.ratio, self.ratio)

    @property
    def meets_target(self) -> bool | None:
        return None if self.target_ratio is None else self.ratio >= self.target_ratio


@dataclass
class BenchResult:
    machine: dict[str, str]
    device_kind: str
    io_mode: str
    host_lock: str
    rows: list[BenchRow] = field(default_factory=list)
    reference: list[tuple[str, int, float | None]] = field(default_factory=list)  # (name, bytes, bytes/s)
    integrity_ok: bool = True
    kernel_view: object | None = None  # agentcg.gpu.kernel_view.KernelView when measured
    elapsed_s: float = 0.0
    notes: list[str] = field(default_factory=list)


def geometry_for(block_bytes: int) -> KVGeometry:
    """A one-layer bf16 geometry with 16 tokens per block and the given block size."""
    per_dim = 2 * 16 * 2  # K and V, 16 tokens, 2 bytes
    if block_bytes % per_dim:
        raise InvalidInput(f"gpu bench: block size must be a multiple of {per_dim} bytes, got {block_bytes}")
    return KVGeometry(layers=1, kv_heads=1, head_dim=block_bytes // per_dim, dtype="bf16", tokens_per_block=16)


def _timed(action: Callable[[], object], sync: Callable[[], None]) -> float:
    sync()
    start = time.perf_counter()
    action()
    sync()
    return time.perf_counter() - start


class _SsdCeiling:
    """fio-like: a scratch file beside the tier's, written and read sequentially in
    CEILING_IO_BYTES requests at queue depth 1 from one aligned buffer (fio
    --rw=write/read --bs=16M --iodepth=1 --direct=1), not by the store's own I/O code."""

    def __init__(self, path: Path, nbytes: int, direct: bool) -> None:
        self.path, self.nbytes, self.direct = path, nbytes, direct
        self.buffer = HostRegion(CEILING_IO_BYTES, locked_bytes=CEILING_IO_BYTES)
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | (os.O_DIRECT if direct else 0), 0o600)
        os.posix_fallocate(self.fd, 0, nbytes)

    def write(self) -> None:
        for offset in range(0, self.nbytes, CEILING_IO_BYTES):
            size = min(CEILING_IO_BYTES, self.nbytes - offset)
            os.pwrite(self.fd, self.buffer.view(0, size), offset)
        if not self.direct:
            os.fdatasync(self.fd)
            os.posix_fadvise(self.fd, 0, self.nbytes, os.POSIX_FADV_DONTNEED)

    def read(self) -> None:
        for offset in range(0, self.nbytes, CEILING_IO_BYTES):
            os.preadv(self.fd, [self.buffer.view(0, min(CEILING_IO_BYTES, self.nbytes - offset))], offset)

    def close(self) -> None:
        os.close(self.fd)
        os.unlink(self.path)
        self.buffer.close()


def _memcpy_loop(dst: torch.Tensor, src: torch.Tensor) -> None:
    """libc memcpy in CEILING_PIECE_BYTES pieces: the memory ceiling on a CPU tier."""
    d, s, n = dst.data_ptr(), src.data_ptr(), src.numel() * src.element_size()
    for offset in range(0, n, CEILING_PIECE_BYTES):
        _MEMCPY(d + offset, s + offset, min(CEILING_PIECE_BYTES, n - offset))


_LIBC = ctypes.CDLL(None)
_MEMCPY = _LIBC.memcpy
_MEMCPY.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
_MEMCPY.restype = ctypes.c_void_p


def machine_description(ssd_dir: Path) -> dict[str, str]:
    cpu = next((line.split(":", 1)[1].strip() for line in PROC.text("cpuinfo").splitlines()
                if line.startswith("model name")), platform.processor() or "unknown")
    mem_kib = PROC.meminfo()["MemTotal"] // 1024
    disk = "unknown"
    best = ""
    for line in PROC.text("mounts").splitlines():
        dev, mount, fstype = line.split()[:3]
        if str(ssd_dir.resolve()).startswith(mount) and len(mount) >= len(best):
            best, disk = mount, f"{dev} ({fstype}) mounted at {mount}"
    stat = os.statvfs(ssd_dir)
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none (torch sees no CUDA device)"
    return {
        "cpu": f"{cpu}, {os.cpu_count()} logical cores",
        "memory": format_bytes(mem_kib * 1024),
        "disk": f"{disk}, {format_bytes(stat.f_bavail * stat.f_frsize)} free",
        "kernel": platform.release(),
        "torch": f"{torch.__version__} ({torch.get_num_threads()} intra-op threads)",
        "gpu": gpu,
    }


def run_bench(ssd_dir: str | os.PathLike | None = None, block_sizes: tuple[int, ...] = DEFAULT_BLOCK_SIZES,
              total_bytes: int = DEFAULT_TOTAL_BYTES, repeats: int = 3, device: str = "auto",
              progress: Callable[[str], None] | None = None, kernel_view: bool = False) -> BenchResult:
    if repeats < 1:
        raise InvalidInput(f"gpu bench: repeats must be at least 1, got {repeats}")
    base = Path(ssd_dir) if ssd_dir is not None else Path(__file__).resolve().parents[1]
    if not base.is_dir():
        raise InvalidInput(f"gpu bench: SSD directory {base} does not exist")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="agentcg-gpu-bench-", dir=base) as tmp:
        result: BenchResult | None = None
        for block_bytes in block_sizes:
            geometry = geometry_for(block_bytes)
            n = total_bytes // block_bytes
            if n < 1:
                raise InvalidInput(f"gpu bench: total {total_bytes} bytes is smaller than a block of {block_bytes}")
            nbytes = n * block_bytes
            if progress:
                progress(f"block size {format_bytes(block_bytes)}: {n} blocks, {format_bytes(nbytes)} per move")
            for layout in LAYOUTS:
                # scattered: a device pool twice the size with every other slot taken
                device_blocks = n if layout == "contiguous" else 2 * n
                with TieredKVStore(geometry, device_blocks, n, tmp, n, device=device) as store:
                    if result is None:
                        result = BenchResult(machine_description(base), store.device_kind, store.ssd.io_mode,
                                             store.host.lock_method)
                    if layout == "scattered":
                        _fragment(store, device_blocks)
                    _bench_one(store, n, nbytes, block_bytes, repeats, Path(tmp), result, layout)
        assert result is not None
        if kernel_view:
            _kernel_view(tmp, min(total_bytes, KERNEL_VIEW_BYTES), result, progress)
    result.elapsed_s = time.perf_counter() - started
    return result


def _fragment(store: TieredKVStore, device_blocks: int) -> None:
    """Every other device slot taken by a one-block request: what is left is scattered."""
    for i in range(device_blocks):
        store.allocate(f"filler-{i}", 1)
    for i in range(0, device_blocks, 2):
        store.discard(f"filler-{i}")


def _device_rows(store: TieredKVStore, rid: str) -> torch.Tensor:
    """The request's blocks, in order, gathered from the device pool (a copy)."""
    pool = store.device.pool
    if pool.device.type == "cpu":
        return torch.from_numpy(pool.numpy()[store._requests[rid].slot])
    slots = torch.from_numpy(store._requests[rid].slot.astype("int64")).to(pool.device)
    return pool.view(torch.int64).index_select(0, slots).view(torch.uint8)   # int64 rows: see device_tier._wide


def _bench_one(store: TieredKVStore, n: int, nbytes: int, block_bytes: int, repeats: int, tmp: Path,
               result: BenchResult, layout: str = "contiguous") -> None:
    cuda = store.device_kind == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    dev, host = store.device.pool[:n], store.host_pool[:n]   # the ceilings' memory: same bytes, same pools
    store.allocate("bench", n)
    pattern = torch.arange(nbytes // 8, dtype=torch.int64).view(n, block_bytes // 8)
    slots = store._requests["bench"].slot
    if cuda:
        store.device.pool.index_copy_(0, torch.from_numpy(slots.astype("int64")).cuda(), pattern.view(torch.uint8).cuda())
    else:
        store.device.pool.numpy()[slots] = pattern.view(torch.uint8).numpy()
    sync()
    before = zlib.crc32(pattern.numpy())
    del pattern
    direct = store.ssd.io_mode == "o_direct"
    ceiling = _SsdCeiling(tmp / "ceiling.blocks", nbytes, direct)
    d2h = (lambda: host.copy_(dev, non_blocking=True)) if cuda else (lambda: _memcpy_loop(host, dev))
    h2d = (lambda: dev.copy_(host, non_blocking=True)) if cuda else (lambda: _memcpy_loop(dev, host))
    # In the order the store's moves must run (each leaves the request where the next starts).
    pairs: list[tuple[str, Callable[[], object], Callable[[], object]]] = [
        ("swap_out", d2h, lambda: store.swap_out("bench").wait()),
        ("swap_in", h2d, lambda: store.swap_in("bench").wait()),
        ("offload", ceiling.write, lambda: store.offload("bench").wait()),
        ("load", ceiling.read, lambda: store.load("bench").wait()),
    ]
    store_s: dict[str, list[float]] = {op: [] for op, _, _ in pairs}
    ceiling_s: dict[str, list[float]] = {op: [] for op, _, _ in pairs}
    try:
        # Warm-up, untimed: starts the transfer and I/O threads, makes the bounce buffer,
        # faults in every page on both sides, writes both files once (no measured write
        # meets unwritten extents), and runs every ceiling once.
        ceiling.write()
        for op, ceiling_run, store_run in pairs:
            ceiling_run()
            store_run()
        sync()
        # Each store move is paired with its ceiling run right before it, on the same memory
        # (the memcpy ceilings write the pool the request is about to move into, so they can
        # only run before the move); a pair's ratio is taken within the pair, so drift on a
        # shared host hits both sides of it.
        for _ in range(repeats):
            for op, ceiling_run, store_run in pairs:
                ceiling_s[op].append(_timed(ceiling_run, sync))
                store_s[op].append(_timed(store_run, sync))
        if layout == "scattered" and store.device.host_addressable and direct:
            _segment_reference(store, ceiling, n, block_bytes, result)
    finally:
        ceiling.close()
    after = zlib.crc32(_device_rows(store, "bench").cpu().numpy())
    if after != before:
        result.integrity_ok = False
        result.notes.append(f"block size {block_bytes} ({layout}): data read back differs from data written")
    kind = "pinned copy" if cuda else "memcpy loop"
    swap_target = SWAP_TARGET if block_bytes >= SWAP_TARGET_MIN_BLOCK else None
    io = "O_DIRECT" if direct else "buffered"
    for op, name, target in (
            ("swap_out", f"{kind} D2H", swap_target),
            ("swap_in", f"{kind} H2D", swap_target),
            ("offload", f"fio-like seq write 16 MiB QD1 ({io})", SSD_TARGET),
            ("load", f"fio-like seq read 16 MiB QD1 ({io})", SSD_TARGET)):
        if layout == "scattered":
            target = SCATTERED_TARGET
        ratios = tuple(c / s for c, s in zip(ceiling_s[op], store_s[op]))
        result.rows.append(BenchRow(op, block_bytes, nbytes, nbytes / statistics.median(store_s[op]), name,
                                    nbytes / statistics.median(ceiling_s[op]), target, layout, ratios))
    if not result.reference:  # once: these do not depend on the block size
        if cuda:
            pageable = torch.empty(nbytes, dtype=torch.uint8)
            flat = dev.view(-1)[:nbytes]
            result.reference.append(("pageable H2D", nbytes, nbytes / _timed(lambda: flat.copy_(pageable), sync)))
            result.reference.append(("pageable D2H", nbytes, nbytes / _timed(lambda: pageable.copy_(flat), sync)))
            del pageable
        else:
            whole = min(_timed(lambda: _MEMCPY(host.data_ptr(), dev.data_ptr(), nbytes), sync) for _ in range(3))
            result.reference.append(("one memcpy call of all the bytes D2H (glibc may use non-temporal "
                                     "stores; not the ceiling)", nbytes, nbytes / whole))
    store.discard("bench")


def _segment_reference(store: TieredKVStore, ceiling: _SsdCeiling, n: int, block_bytes: int,
                       result: BenchResult) -> None:
    """What the disk itself does with the request's memory layout: the ceiling's own loop
    (sequential 16 MiB requests, QD1, on its file) with each request's buffer given as the
    request's scattered blocks, one iovec each. Printed for reference, never the ceiling."""
    from agentcg.gpu.kvstore_iov import plan_ios, run_ios

    slots = store._requests["bench"].slot.astype(np.uint64)
    plan = plan_ios(np.arange(n, dtype=np.int64) * block_bytes, store.device.region.address + slots * block_bytes,
                    np.full(n, block_bytes, dtype=np.int64))
    rates = []
    for own, segmented in ((ceiling.write, lambda: run_ios(ceiling.fd, plan, write=True, pool=None)),
                           (ceiling.read, lambda: run_ios(ceiling.fd, plan, write=False, pool=None))):
        pairs = [(_timed(own, lambda: None), _timed(segmented, lambda: None)) for _ in range(3)]
        rates.append(statistics.median(a / b for a, b in pairs))
    result.reference.append((f"ceiling's own I/O loop with the blocks as {format_bytes(block_bytes)} iovecs, "
                             f"as ratio of it: write {rates[0]:.2f}, read {rates[1]:.2f}", n * block_bytes, None))


def _kernel_view(ssd_dir: str, nbytes: int, result: BenchResult, progress: Callable[[str], None] | None) -> None:
    from agentcg.errors import AgentcgError
    from agentcg.gpu.kernel_view import measure

    if progress:
        progress(f"kernel view: offload and load {format_bytes(nbytes)} in a watched cgroup")
    try:
        result.kernel_view = measure(ssd_dir, nbytes)
    except (AgentcgError, OSError) as exc:
        result.notes.append(f"kernel view not measured: {exc}")


def format_result(result: BenchResult) -> str:
    lines = ["agentcg gpu bench", ""]
    lines += [f"  {k:<7} {v}" for k, v in result.machine.items()]
    lines += [f"  device tier: {result.device_kind}; host pool locked by: {result.host_lock}; "
              f"SSD tier I/O: {result.io_mode}", ""]
    repeats = max((len(r.ratios) for r in result.rows), default=0)
    lines += [f"  each row: {repeats} repetitions after a warm-up, each store move right after its own ceiling run; "
              "ratio = median over the pairs of ceiling time / store time, [lowest..highest]", ""]
    header = (f"{'op':<9} {'layout':<10} {'block':>9} {'moved':>9} {'store':>11} {'ceiling':>11}  {'ratio':>6} "
              f"{'spread':>13}  {'target':>7}  ceiling is")
    lines += [header, "-" * len(header)]
    for row in result.rows:
        target = "-" if row.target_ratio is None else f">={row.target_ratio:.2f}"
        verdict = "" if row.meets_target is None else ("  ok" if row.meets_target else "  MISSED")
        low, high = row.spread
        lines.append(f"{row.op:<9} {row.layout:<10} {format_bytes(row.block_bytes):>9} {format_bytes(row.bytes):>9} "
                     f"{row.store_bytes_per_s / 1e9:>7.2f} GB/s {row.ceiling_bytes_per_s / 1e9:>6.2f} GB/s  "
                     f"{row.ratio:>6.3f} [{low:5.2f}..{high:5.2f}]  {target:>7}  {row.ceiling}{verdict}")
    for name, nbytes, rate in result.reference:
        figure = "" if rate is None else f": {rate / 1e9:.2f} GB/s"   # None: the name carries the figures
        lines.append(f"reference: {name} of {format_bytes(nbytes)}{figure}")
    view = result.kernel_view
    if view is not None:
        lines.append(f"kernel view (BPF block I/O charged to the store's cgroup, {view.io_mode}): "
                     f"written: store {view.store_write_bytes} B, kernel {view.kernel_write_bytes} B; "
                     f"read: store {view.store_read_bytes} B, kernel {view.kernel_read_bytes} B "
                     "(kernel reads include the child's own start-up)")
    met = [r.meets_target for r in result.rows if r.meets_target is not None]
    lines += ["", f"targets met: {sum(met)}/{len(met)}; data integrity: "
              f"{'every block read back equal' if result.integrity_ok else 'FAILED'}; "
              f"elapsed {result.elapsed_s:.1f} s"]
    lines += [f"note: {note}" for note in result.notes]
    return "\n".join(lines)
