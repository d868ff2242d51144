"""CUDA copy tracing for engines agentcg does not embed (vLLM, SGLang, ...): bcc uprobes
on libcudart's cudaMemcpy/cudaMemcpyAsync and libcuda's cuMemcpy*_v2 of one process.

    with CudaCopyTracer(pid) as tracer:
        ...
        counters = tracer.counters()     # CudaCopyCounters: per direction and per API
        tracer.libraries                 # {"libcudart": path or "missing", "libcuda": ...}

Libraries are looked up first among what the process has mapped (/proc/<pid>/maps), then
(libcudart) in the nvidia-cuda-runtime-cu12 wheel, then (libcuda, the driver) in the usual
system directories; one that is not found is reported "missing" and not probed.
Not seen: copies done by kernels through mapped/managed host memory, copies inside CUDA
graphs replayed by cudaGraphLaunch, cudaMemcpy2D/3D and peer copies, and a statically
linked cudart (probe the executable itself by passing its path as libcudart).
"""
from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from agentcg.bpf.monitor import load_bcc
from agentcg.errors import AgentcgError, BpfError, HostUnsupported, InvalidInput
from agentcg.procfs import PROC

PROGRAM = Path(__file__).with_name("cudacopy.bpf.c")
UPROBE_PMU = Path("/sys/bus/event_source/devices/uprobe")

# (symbol, library, BPF function); the index is the API number in cudacopy.bpf.c.
APIS: tuple[tuple[str, str, str], ...] = (
    ("cudaMemcpy", "libcudart", "on_cuda_memcpy"),
    ("cudaMemcpyAsync", "libcudart", "on_cuda_memcpy_async"),
    ("cuMemcpyHtoD_v2", "libcuda", "on_cu_htod"),
    ("cuMemcpyDtoH_v2", "libcuda", "on_cu_dtoh"),
    ("cuMemcpyHtoDAsync_v2", "libcuda", "on_cu_htod_async"),
    ("cuMemcpyDtoHAsync_v2", "libcuda", "on_cu_dtoh_async"),
    ("cuMemcpyDtoDAsync_v2", "libcuda", "on_cu_dtod_async"),
    ("cuMemcpyAsync", "libcuda", "on_cu_memcpy_async"),
)
# cudaMemcpyKind order, then "other" for a kind outside it.
DIRECTIONS = ("host_to_host", "host_to_device", "device_to_host", "device_to_device", "default", "other")
LIB_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib64", "/usr/lib", "/usr/local/cuda/lib64",
            "/usr/local/cuda/compat", "/usr/lib/wsl/lib")


class CopyStat(ctypes.Structure):
    """Mirror of `struct copy_stat` in cudacopy.bpf.c."""

    _fields_ = [("calls", ctypes.c_uint64), ("bytes", ctypes.c_uint64)]


class CopyTotals(NamedTuple):
    calls: int
    bytes: int


@dataclass(frozen=True)
class CudaCopyCounters:
    by_api: dict[str, dict[str, CopyTotals]]  # API -> direction -> totals (non-zero only)

    def direction(self, name: str) -> CopyTotals:
        if name not in DIRECTIONS:
            raise InvalidInput(f"CUDA copy direction must be one of {', '.join(DIRECTIONS)}, got {name!r}")
        found = [d[name] for d in self.by_api.values() if name in d]
        return CopyTotals(sum(t.calls for t in found), sum(t.bytes for t in found))

    @property
    def host_to_device_bytes(self) -> int:
        return self.direction("host_to_device").bytes

    @property
    def device_to_host_bytes(self) -> int:
        return self.direction("device_to_host").bytes


def _mapped(pid: int, stem: str) -> str | None:
    try:
        maps = PROC.maps(pid)
    except AgentcgError:
        return None
    for line in maps.splitlines():
        path = line.split(None, 5)[-1] if line.count(" ") >= 5 else ""
        if os.path.basename(path).startswith(stem + ".so") and os.path.exists(path):
            return path
    return None


def find_library(pid: int, name: str) -> str | None:
    """Path of libcudart or libcuda for `pid`, or None."""
    found = _mapped(pid, name)
    if found:
        return found
    if name == "libcudart":
        try:
            import nvidia.cuda_runtime  # the nvidia-cuda-runtime-cu12 wheel
        except ImportError:
            return None
        for base in nvidia.cuda_runtime.__path__:
            candidate = Path(base) / "lib" / "libcudart.so.12"
            if candidate.exists():
                return str(candidate)
        return None
    for directory in LIB_DIRS:
        candidate = Path(directory) / "libcuda.so.1"
        if candidate.exists():
            return str(candidate)
    return None


class CudaCopyTracer:
    def __init__(self, pid: int, *, libcudart: str | None = None, libcuda: str | None = None) -> None:
        if isinstance(pid, bool) or not isinstance(pid, int) or pid <= 0:
            raise InvalidInput(f"CUDA copy tracer: pid must be a positive integer, got {pid!r}")
        if not PROC.is_alive(pid):
            raise InvalidInput(f"CUDA copy tracer: no process {pid}")
        if not UPROBE_PMU.exists():
            raise HostUnsupported(f"uprobes are not available ({UPROBE_PMU} missing); the kernel needs CONFIG_UPROBE_EVENTS")
        self.pid = pid
        self.libraries = {
            "libcudart": libcudart or find_library(pid, "libcudart") or "missing",
            "libcuda": libcuda or find_library(pid, "libcuda") or "missing",
        }
        for name, path in (("libcudart", libcudart), ("libcuda", libcuda)):
            if path is not None and not Path(path).exists():
                raise InvalidInput(f"CUDA copy tracer: {name} path {path} does not exist")
        if all(path == "missing" for path in self.libraries.values()):
            raise HostUnsupported("CUDA copy tracer: neither libcudart nor libcuda found for process "
                                  f"{pid}; pass libcudart=<path> (pip install nvidia-cuda-runtime-cu12)")
        BPF = load_bcc().BPF  # python3-bpfcc from the distribution, never PyPI's "bcc"

        cflags = [f"-DTARGET_TGID={int(pid)}", f"-DN_APIS={len(APIS)}", f"-DN_DIRS={len(DIRECTIONS)}"]
        try:
            self._bpf = BPF(text=PROGRAM.read_bytes(), cflags=cflags)
        except Exception as exc:
            raise BpfError(f"CUDA copy tracer: compiling {PROGRAM.name} failed: {exc}") from None
        self.attached: list[str] = []
        try:
            for symbol, library, fn_name in APIS:
                path = self.libraries[library]
                if path == "missing":
                    continue
                self._bpf.attach_uprobe(name=path.encode(), sym=symbol.encode(), fn_name=fn_name.encode(), pid=pid)
                self.attached.append(symbol)
        except Exception as exc:
            self.close()
            raise BpfError(f"CUDA copy tracer: attaching uprobe to {symbol} in {path} failed: {exc}") from None
        self._stats = self._bpf[b"copy_stats"]

    def counters(self) -> CudaCopyCounters:
        by_api: dict[str, dict[str, CopyTotals]] = {}
        n_dirs = len(DIRECTIONS)
        for key, value in self._stats.items():
            if value.calls:
                api, direction = divmod(key.value, n_dirs)
                by_api.setdefault(APIS[api][0], {})[DIRECTIONS[direction]] = CopyTotals(value.calls, value.bytes)
        return CudaCopyCounters(by_api)

    def close(self) -> None:
        bpf = getattr(self, "_bpf", None)
        if bpf is not None:
            self._bpf = None
            bpf.cleanup()

    def __enter__(self) -> "CudaCopyTracer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
