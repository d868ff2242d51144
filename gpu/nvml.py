"""NVML sampling: per GPU memory, utilisation, PCIe bytes, and per-process memory by owner.

    with NvmlSampler() as sampler:        # raises NvmlMissing without NVML or a GPU
        for gpu in sampler.sample():      # list[GpuSample]
            ...

PCIe bytes come from the cumulative NVML field values NVML_FI_DEV_PCIE_COUNT_TX/RX_BYTES
where the driver has them (rates are differences between samples); else from
nvmlDeviceGetPcieThroughput, a rate over a ~20 ms window in KB/s (no cumulative count);
`pcie_source` names which: "nvml-field-values", "nvml-pcie-throughput" or "unavailable".
Processes on a GPU are mapped through /proc/<pid>/cgroup to a sandbox, the engine or other.
`nvml` may be any module with the pynvml API (tests inject a fake one; the host has none).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from agentcg.errors import HostUnsupported
from agentcg.gpu.proc_cgroup import CgroupOwners, read_proc_cgroups

PROCESSES_MAX = 256  # per GPU and sample: bounded label sets downstream


class NvmlMissing(HostUnsupported):
    """NVML (the NVIDIA driver's management library) or a GPU is not there."""


@dataclass(frozen=True)
class GpuProcessSample:
    pid: int
    gpu_index: int
    used_memory_bytes: int | None  # None where the driver does not report it
    owner: str                     # "engine", "sandbox:<name>", "other" or "gone"
    cgroup: str | None


@dataclass(frozen=True)
class GpuSample:
    monotonic_s: float
    wall_s: float
    index: int
    uuid: str
    name: str
    memory_used_bytes: int
    memory_total_bytes: int
    utilization_gpu_ratio: float | None      # 0..1 over the driver's last sample period
    utilization_memory_ratio: float | None
    pcie_source: str
    pcie_tx_bytes: int | None = None         # cumulative, field values only
    pcie_rx_bytes: int | None = None
    pcie_tx_bytes_per_s: float | None = None
    pcie_rx_bytes_per_s: float | None = None
    processes: tuple[GpuProcessSample, ...] = field(default_factory=tuple)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class NvmlSampler:
    def __init__(self, nvml: ModuleType | None = None, *, proc_root: str | Path = "/proc",
                 owners: CgroupOwners = CgroupOwners()) -> None:
        self._nvml = nvml
        self._proc_root = proc_root
        self._owners = owners
        self._handles: list[Any] = []
        self._sources: list[str] = []
        self._last: dict[int, tuple[float, int, int]] = {}
        self._open = False

    def open(self) -> "NvmlSampler":
        nvml = self._nvml
        if nvml is None:
            try:
                import pynvml as nvml
            except ImportError:
                raise NvmlMissing("NVML is not available: the nvidia-ml-py package (pynvml) is not installed") from None
            self._nvml = nvml
        try:
            nvml.nvmlInit()
        except nvml.NVMLError as exc:
            raise NvmlMissing(f"NVML is not available ({exc}): no NVIDIA driver on this host; "
                              "install the driver to sample GPUs") from None
        self._open = True
        count = nvml.nvmlDeviceGetCount()
        if count == 0:
            self.close()
            raise NvmlMissing("NVML found no GPU on this host")
        self._handles = [nvml.nvmlDeviceGetHandleByIndex(i) for i in range(count)]
        self._sources = [self._probe_pcie(h) for h in self._handles]
        return self

    def _probe_pcie(self, handle: Any) -> str:
        nvml = self._nvml
        try:
            if self._pcie_counters(handle) is not None:
                return "nvml-field-values"
        except nvml.NVMLError:
            pass
        try:
            nvml.nvmlDeviceGetPcieThroughput(handle, nvml.NVML_PCIE_UTIL_TX_BYTES)
            return "nvml-pcie-throughput"
        except nvml.NVMLError:
            return "unavailable"

    def _pcie_counters(self, handle: Any) -> tuple[int, int] | None:
        nvml = self._nvml
        values = nvml.nvmlDeviceGetFieldValues(
            handle, [nvml.NVML_FI_DEV_PCIE_COUNT_TX_BYTES, nvml.NVML_FI_DEV_PCIE_COUNT_RX_BYTES])
        if any(v.nvmlReturn != nvml.NVML_SUCCESS for v in values):
            return None
        return int(values[0].value.ullVal), int(values[1].value.ullVal)

    def sample(self) -> list[GpuSample]:
        if not self._open:
            self.open()
        nvml = self._nvml
        now, wall = time.monotonic(), time.time()
        samples = []
        for index, (handle, source) in enumerate(zip(self._handles, self._sources)):
            memory = nvml.nvmlDeviceGetMemoryInfo(handle)
            try:
                util = nvml.nvmlDeviceGetUtilizationRates(handle)
                gpu_ratio, mem_ratio = util.gpu / 100.0, util.memory / 100.0
            except nvml.NVMLError:
                gpu_ratio = mem_ratio = None
            pcie: dict[str, Any] = {}
            if source == "nvml-field-values":
                counters = self._pcie_counters(handle)
                if counters is not None:
                    tx, rx = counters
                    pcie.update(pcie_tx_bytes=tx, pcie_rx_bytes=rx)
                    last = self._last.get(index)
                    if last is not None and now > last[0]:
                        pcie.update(pcie_tx_bytes_per_s=(tx - last[1]) / (now - last[0]),
                                    pcie_rx_bytes_per_s=(rx - last[2]) / (now - last[0]))
                    self._last[index] = (now, tx, rx)
            elif source == "nvml-pcie-throughput":
                pcie.update(
                    pcie_tx_bytes_per_s=1024.0 * nvml.nvmlDeviceGetPcieThroughput(handle, nvml.NVML_PCIE_UTIL_TX_BYTES),
                    pcie_rx_bytes_per_s=1024.0 * nvml.nvmlDeviceGetPcieThroughput(handle, nvml.NVML_PCIE_UTIL_RX_BYTES))
            samples.append(GpuSample(
                monotonic_s=now, wall_s=wall, index=index, uuid=_text(nvml.nvmlDeviceGetUUID(handle)),
                name=_text(nvml.nvmlDeviceGetName(handle)), memory_used_bytes=int(memory.used),
                memory_total_bytes=int(memory.total), utilization_gpu_ratio=gpu_ratio,
                utilization_memory_ratio=mem_ratio, pcie_source=source,
                processes=self._processes(index, handle), **pcie))
        return samples

    def _processes(self, index: int, handle: Any) -> tuple[GpuProcessSample, ...]:
        nvml = self._nvml
        seen: dict[int, GpuProcessSample] = {}
        for getter in ("nvmlDeviceGetComputeRunningProcesses", "nvmlDeviceGetGraphicsRunningProcesses"):
            try:
                procs = getattr(nvml, getter)(handle)
            except (nvml.NVMLError, AttributeError):
                continue
            for proc in procs:
                if proc.pid in seen or len(seen) >= PROCESSES_MAX:
                    continue
                owner, cgroup = self._owners.owner_of(read_proc_cgroups(proc.pid, self._proc_root))
                used = proc.usedGpuMemory
                seen[proc.pid] = GpuProcessSample(proc.pid, index, None if used is None else int(used), owner, cgroup)
        return tuple(seen.values())

    def close(self) -> None:
        if self._open:
            self._open = False
            try:
                self._nvml.nvmlShutdown()
            except self._nvml.NVMLError:
                pass

    def __enter__(self) -> "NvmlSampler":
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()


def sample_gpus(nvml: ModuleType | None = None) -> list[GpuSample]:
    """One-shot: open NVML, sample every GPU, close. Raises NvmlMissing without NVML or a GPU.
    For the exporter and the trace writer, which call it once per scrape or sample period."""
    with NvmlSampler(nvml) as sampler:
        return sampler.sample()
