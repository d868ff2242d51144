"""NVML sampling. This host has no NVIDIA driver: the real no-NVML path is tested as is, and
the sampler's logic against `FakeNvml`, a mock of the pynvml API standing in for the driver
this host lacks (two GPUs: one with cumulative PCIe field values, one with only throughput)."""
from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import pytest

from agentcg.cli import main
from agentcg.gpu.nvml import NvmlMissing, NvmlSampler, sample_gpus
from agentcg.gpu.proc_cgroup import CgroupOwners, ProcCgroups, read_proc_cgroups


def _host_has_nvml() -> bool:
    try:
        import pynvml
        pynvml.nvmlInit()
        pynvml.nvmlShutdown()
        return True
    except Exception:
        return False


class FakeNvml:
    """Mock of pynvml for a host without the NVIDIA driver (see the module docstring)."""

    NVML_SUCCESS = 0
    NVML_ERROR_NOT_SUPPORTED = 3
    NVML_FI_DEV_PCIE_COUNT_TX_BYTES = 197
    NVML_FI_DEV_PCIE_COUNT_RX_BYTES = 198
    NVML_PCIE_UTIL_TX_BYTES = 0
    NVML_PCIE_UTIL_RX_BYTES = 1

    class NVMLError(Exception):
        pass

    def __init__(self, procs: dict[int, list[tuple[int, int | None]]]) -> None:
        self.procs = procs             # gpu index -> [(pid, used bytes or None)]
        self.tx = [1_000_000, 0]
        self.inits = self.shutdowns = 0

    def nvmlInit(self): self.inits += 1
    def nvmlShutdown(self): self.shutdowns += 1
    def nvmlDeviceGetCount(self): return 2
    def nvmlDeviceGetHandleByIndex(self, i): return i
    def nvmlDeviceGetName(self, h): return b"Fake H100" if h == 0 else "Fake L4"
    def nvmlDeviceGetUUID(self, h): return f"GPU-{h}"
    def nvmlDeviceGetMemoryInfo(self, h): return SimpleNamespace(used=(h + 1) * 2**30, total=80 * 2**30)
    def nvmlDeviceGetUtilizationRates(self, h): return SimpleNamespace(gpu=50 + h, memory=10)

    def nvmlDeviceGetFieldValues(self, h, ids):
        ret = self.NVML_SUCCESS if h == 0 else self.NVML_ERROR_NOT_SUPPORTED
        value = lambda n: SimpleNamespace(nvmlReturn=ret, value=SimpleNamespace(ullVal=n))
        return [value(self.tx[h]), value(2 * self.tx[h])]

    def nvmlDeviceGetPcieThroughput(self, h, counter):
        return 100 if counter == self.NVML_PCIE_UTIL_TX_BYTES else 200   # KB/s

    def nvmlDeviceGetComputeRunningProcesses(self, h):
        return [SimpleNamespace(pid=pid, usedGpuMemory=used) for pid, used in self.procs.get(h, [])]

    def nvmlDeviceGetGraphicsRunningProcesses(self, h):
        raise self.NVMLError("not supported")


@pytest.fixture
def proc_tree(tmp_path: Path) -> Path:
    """A fixture /proc: a sandbox process on a hybrid host (v2 path "/", v1 memory path set),
    an engine on a pure-v2 host, and an unrelated process."""
    for pid, text in {
        101: "4:memory:/agentcg/sb1/tools/call-3\n0::/\n",
        102: "0::/agentcg/engine\n",
        103: "0::/system.slice/sshd.service\n",
    }.items():
        (tmp_path / str(pid)).mkdir()
        (tmp_path / str(pid) / "cgroup").write_text(text)
    return tmp_path


@pytest.mark.skipif(_host_has_nvml(), reason="this host has NVML; the no-NVML path cannot be seen")
def test_real_host_without_nvml_says_so():
    with pytest.raises(NvmlMissing, match="NVML is not available"):
        NvmlSampler().open()
    with pytest.raises(NvmlMissing):
        sample_gpus()


@pytest.mark.skipif(_host_has_nvml(), reason="this host has NVML; the no-NVML path cannot be seen")
def test_watch_without_nvml_exit_codes(capsys):
    assert main(["gpu", "watch", "--count", "1"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("agentcg: error: NVML is not available") and err.count("\n") == 1
    assert main(["gpu", "watch", "--count", "1", "--allow-missing"]) == 0
    out = capsys.readouterr().out
    assert "NVML is not available" in out and "nothing to sample" in out


def test_sampler_reads_memory_util_pcie_and_owners(proc_tree):
    fake = FakeNvml({0: [(101, 3 * 2**30), (102, 40 * 2**30)], 1: [(103, None), (999, 1)]})
    with NvmlSampler(fake, proc_root=proc_tree) as sampler:
        first = sampler.sample()
        fake.tx[0] += 5_000_000
        second = sampler.sample()
    assert fake.inits == 1 and fake.shutdowns == 1
    gpu0, gpu1 = second
    assert (gpu0.name, gpu0.uuid, gpu1.name) == ("Fake H100", "GPU-0", "Fake L4")
    assert gpu0.memory_used_bytes == 2**30 and gpu0.memory_total_bytes == 80 * 2**30
    assert gpu0.utilization_gpu_ratio == pytest.approx(0.50)
    # GPU 0: cumulative counters from field values, rate from the difference between samples
    assert gpu0.pcie_source == "nvml-field-values"
    assert first[0].pcie_tx_bytes_per_s is None and gpu0.pcie_tx_bytes == 6_000_000
    elapsed = gpu0.monotonic_s - first[0].monotonic_s
    assert gpu0.pcie_tx_bytes_per_s == pytest.approx(5_000_000 / elapsed)
    # GPU 1: no field values -> throughput (KB/s), no cumulative count
    assert gpu1.pcie_source == "nvml-pcie-throughput"
    assert gpu1.pcie_tx_bytes is None and gpu1.pcie_rx_bytes_per_s == 200 * 1024
    owners = {p.pid: (p.owner, p.cgroup, p.used_memory_bytes) for g in second for p in g.processes}
    assert owners == {
        101: ("sandbox:sb1", "/agentcg/sb1/tools/call-3", 3 * 2**30),
        102: ("engine", "/agentcg/engine", 40 * 2**30),
        103: ("other", "/system.slice/sshd.service", None),
        999: ("gone", None, 1),
    }


def test_read_proc_cgroups_of_a_real_process():
    mine = read_proc_cgroups(os.getpid())
    assert mine is not None and mine.v2 is not None        # every Linux process has a v2 line
    assert read_proc_cgroups(2**22 + 7) is None              # beyond pid_max: gone
    owners = CgroupOwners(root="agentcg", engine="vllm")
    assert owners.owner_of(ProcCgroups("/agentcg/vllm/worker", None)) == ("engine", "/agentcg/vllm/worker")
    assert owners.owner_of(ProcCgroups("/agentcg", None)) == ("other", "/agentcg")
