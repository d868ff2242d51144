"""The doctor's file probes against fixture host trees (tests/fixtures/doctor/): a pure
cgroup v2 host with every feature, and an older hybrid host without BTF and with tracefs
unmounted. This host cannot be either, so fixtures stand in; the live probes (bpf(2),
bcc load, NVML) still run against the real kernel when a whole report is made."""
from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest

from agentcg.cli import main
from agentcg.controller.doctor import HostRoots, probe_host, probe_nvml
from agentcg.controller.doctor_btf import btf_has_struct, read_btf
from agentcg.errors import HostUnsupported

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "doctor"
FILE_CHECKS = ("kernel", "bpf_jit", "btf", "tracefs", "kernel_headers", "kprobes", "uprobes",
               "sched_ext", "memcg_bpf_struct_ops", "cgroup_layout", "cgroup_v2_freeze_kill",
               "psi", "psi_cgroup", "swap", "zswap")
BTF_INT, BTF_STRUCT, BTF_FUNC = 1, 4, 12


def make_btf(types: list[tuple[int, str, int]]) -> bytes:
    """A raw BTF blob holding (kind, name, vlen) types, members zero-filled."""
    strings, type_bytes = b"\0", b""
    for kind, name, vlen in types:
        name_off = len(strings)
        strings += name.encode() + b"\0"
        type_bytes += struct.pack("<III", name_off, (kind << 24) | vlen, 8)
        type_bytes += {BTF_INT: b"\0" * 4, BTF_STRUCT: b"\0" * 12 * vlen}.get(kind, b"")
    header = struct.pack("<HBBIIIII", 0xEB9F, 1, 0, 24, 0, len(type_bytes), len(type_bytes), len(strings))
    return header + type_bytes + strings


def host_tree(name: str, tmp_path: Path) -> Path:
    root = tmp_path / name
    shutil.copytree(FIXTURES / name, root)
    mounts = root / "proc/mounts"
    mounts.write_text(mounts.read_text().replace("@ROOT@", str(root)))
    return root


@pytest.fixture
def pure_v2(tmp_path) -> Path:
    root = host_tree("pure_v2", tmp_path)
    btf = root / "sys/kernel/btf/vmlinux"
    btf.parent.mkdir(parents=True)
    btf.write_bytes(make_btf([(BTF_INT, "int", 0), (BTF_STRUCT, "task_struct", 3),
                              (BTF_FUNC, "bpf_memcg_thing", 0), (BTF_STRUCT, "memcg_bpf_ops", 2)]))
    return root


@pytest.fixture
def old_host(tmp_path) -> Path:
    return host_tree("no_btf_tracefs", tmp_path)


def statuses(root: Path) -> dict[str, str]:
    report = probe_host(HostRoots.under(root), only=FILE_CHECKS)
    return {c.name: c.status for c in report.checks}


def test_pure_v2_host_has_everything(pure_v2):
    report = probe_host(HostRoots.under(pure_v2), only=FILE_CHECKS)
    assert {c.name: c.status for c in report.checks} == {
        "kernel": "ok", "bpf_jit": "ok", "btf": "ok", "tracefs": "ok", "kernel_headers": "ok",
        "kprobes": "ok", "uprobes": "ok", "sched_ext": "ok", "memcg_bpf_struct_ops": "ok",
        "cgroup_layout": "ok", "cgroup_v2_freeze_kill": "ok", "psi": "ok", "psi_cgroup": "ok",
        "swap": "ok", "zswap": "ok"}
    layout = report.check("cgroup_layout").data
    assert layout["kind"] == "v2" and layout["nsdelegate"] is True
    assert layout["controllers"]["memory"] == "v2" and layout["v1_mounts"] == {}
    assert "system.slice" in report.check("cgroup_v2_freeze_kill").detail
    assert report.check("swap").data["total_bytes"] == 4194300 * 1024
    assert report.check("sched_ext").data["state"] == "disabled"
    assert report.check("kernel_headers").data["headers_release"] == "6.12.0-test"


def test_old_host_without_btf_and_tracefs(old_host):
    report = probe_host(HostRoots.under(old_host), only=FILE_CHECKS)
    assert {c.name: c.status for c in report.checks} == {
        "kernel": "warning", "bpf_jit": "missing", "btf": "unsupported", "tracefs": "missing",
        "kernel_headers": "missing", "kprobes": "unsupported", "uprobes": "missing",
        "sched_ext": "unsupported", "memcg_bpf_struct_ops": "unsupported", "cgroup_layout": "ok",
        "cgroup_v2_freeze_kill": "unsupported", "psi": "unsupported", "psi_cgroup": "missing",
        "swap": "missing", "zswap": "unsupported"}
    assert report.check("tracefs").fix == "mount -t tracefs tracefs /sys/kernel/tracing"
    assert report.check("cgroup_v2_freeze_kill").detail.startswith("cgroup.kill absent")
    layout = report.check("cgroup_layout").data
    assert layout["kind"] == "hybrid" and layout["controllers"] == {"memory": "v1", "cpu": "v1"}
    assert {"btf", "tracefs", "cgroup_v2_freeze_kill"} <= set(report.core_failures)


def test_v1_only_host_is_unsupported(tmp_path):
    root = tmp_path / "v1"
    (root / "proc").mkdir(parents=True)
    (root / "proc/mounts").write_text(f"cgroup {root}/memory cgroup rw,memory 0 0\n")
    check = probe_host(HostRoots.under(root), only=["cgroup_layout"]).check("cgroup_layout")
    assert check.status == "unsupported" and "cgroup2" in check.fix


def test_v2_root_with_only_agentcg_children_gets_a_probe_cgroup_that_is_removed(pure_v2):
    """agentcg's own cgroups come and go under other processes: never borrow one."""
    cgroups = pure_v2 / "sys/fs/cgroup"
    (cgroups / "system.slice").rename(cgroups / "agentcg-test-1234")
    report = probe_host(HostRoots.under(pure_v2), only=["cgroup_v2_freeze_kill"])
    check = report.check("cgroup_v2_freeze_kill")
    # a plain directory is not a cgroup: mkdir gives no interface files
    assert check.status == "unsupported" and "probe cgroup" in check.detail
    assert not list((pure_v2 / "sys/fs/cgroup").glob("agentcg-doctor-*"))


def test_the_process_own_v2_cgroup_is_preferred(pure_v2):
    own = pure_v2 / "sys/fs/cgroup/user.slice/session-3.scope"
    own.mkdir(parents=True)
    for name in ("cgroup.procs", "cgroup.freeze", "cgroup.kill", "memory.pressure"):
        (own / name).write_text("")
    (pure_v2 / "proc/self").mkdir()
    (pure_v2 / "proc/self/cgroup").write_text("0::/user.slice/session-3.scope\n")
    report = probe_host(HostRoots.under(pure_v2), only=["cgroup_v2_freeze_kill", "psi_cgroup"])
    assert report.check("cgroup_v2_freeze_kill").detail.endswith(f"this process's cgroup {own}")
    assert report.check("psi_cgroup").status == "ok"
    assert report.check("psi_cgroup").data["resources"] == ["memory"]


def test_btf_struct_found_only_as_a_struct(tmp_path):
    path = tmp_path / "vmlinux"
    path.write_bytes(make_btf([(BTF_INT, "int", 0), (BTF_STRUCT, "a", 1), (BTF_FUNC, "memcg_bpf_ops", 0)]))
    btf = read_btf(path)
    assert btf.has_name("memcg_bpf_ops")
    assert not btf_has_struct(btf, "memcg_bpf_ops")
    assert btf_has_struct(btf, "a")
    assert not btf_has_struct(btf, "absent")


def test_garbage_btf_is_refused(tmp_path):
    path = tmp_path / "vmlinux"
    path.write_bytes(b"\x7fELF" + b"\0" * 40)
    with pytest.raises(HostUnsupported, match="not a raw BTF blob"):
        read_btf(path)
    path.write_bytes(b"\x9f\xeb")
    with pytest.raises(HostUnsupported, match="too short"):
        read_btf(path)


def test_memcg_struct_ops_in_the_real_btf_walk_terminates():
    """The type walk over this kernel's real blob (about 5 MiB) visits every record."""
    btf = read_btf(Path("/sys/kernel/btf/vmlinux"))
    assert btf_has_struct(btf, "task_struct")
    assert btf_has_struct(btf, "cgroup")


class FakeNvml:
    """Stands in for pynvml: this host has no GPU and no NVIDIA driver."""

    class NVMLError(Exception):
        pass

    def __init__(self, names=(), init_error=None):
        self.names, self.init_error, self.shut_down = list(names), init_error, False

    def nvmlInit(self):
        if self.init_error:
            raise self.NVMLError(self.init_error)

    def nvmlShutdown(self):
        self.shut_down = True

    def nvmlSystemGetDriverVersion(self):
        return b"550.54.15"

    def nvmlDeviceGetCount(self):
        return len(self.names)

    def nvmlDeviceGetHandleByIndex(self, index):
        return index

    def nvmlDeviceGetName(self, handle):
        return self.names[handle]


def test_nvml_reports_gpus_and_shuts_down():
    fake = FakeNvml(names=[b"NVIDIA H200", "NVIDIA H200"])
    check = probe_nvml(fake)
    assert check.status == "ok" and check.data["count"] == 2
    assert check.detail == "2 GPU(s): NVIDIA H200, NVIDIA H200; driver 550.54.15"
    assert fake.shut_down


def test_nvml_without_gpus_or_driver_is_missing_not_an_error():
    assert probe_nvml(FakeNvml()).status == "missing"
    check = probe_nvml(FakeNvml(init_error="NVML Shared Library Not Found"))
    assert check.status == "missing"
    assert check.detail == "no NVIDIA driver (libnvidia-ml.so.1 not found)"


def test_cli_exits_1_naming_the_failed_core_checks(old_host, capsys):
    assert main(["doctor", "--root", str(old_host)]) == 1
    out, err = capsys.readouterr()
    assert "agentcg: error: core features not usable: btf, tracefs, cgroup_v2_freeze_kill" in err
    assert "fix: mount -t tracefs tracefs /sys/kernel/tracing" in out
    assert "core (BPF and cgroups): NOT ok: btf, tracefs, cgroup_v2_freeze_kill" in out


def test_cli_json_on_a_pure_v2_tree(pure_v2, capsys):
    assert main(["doctor", "--json", "--root", str(pure_v2)]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["core_ok"] is True
    assert {c["name"]: c["status"] for c in data["checks"]}["memcg_bpf_struct_ops"] == "ok"
