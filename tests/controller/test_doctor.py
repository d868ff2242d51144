"""The doctor on the real host: every expectation below comes from an independent, simpler
look at the same kernel interface, so the test holds on other hosts and still fails when a
probe misreads this one."""
from __future__ import annotations

import ctypes.util
import gzip
import json
import os
from pathlib import Path

import pytest

from agentcg.controller import doctor_pytest
from agentcg.controller.doctor import CHECK_NAMES, CORE_CHECKS, Check, HostReport, probe_host
from agentcg.errors import InvalidInput


@pytest.fixture(scope="module")
def report() -> HostReport:
    return probe_host()


def _kernel_config_text() -> str:
    try:
        return gzip.decompress(Path("/proc/config.gz").read_bytes()).decode()
    except OSError:
        return ""


def test_every_check_is_reported_once_in_order(report):
    assert tuple(c.name for c in report.checks) == CHECK_NAMES


def test_core_is_usable_on_a_host_set_up_by_host_sh(report):
    """This project's hosts run scripts/host.sh setup; BPF and cgroups must work there."""
    assert report.core_ok, [report.check(n).to_dict() for n in report.core_failures]
    for name in ("bpf_syscall", "btf", "tracefs", "bcc", "bcc_load", "cgroup_layout",
                 "cgroup_v2_freeze_kill"):
        assert report.check(name).status == "ok", report.check(name)


def test_bcc_load_really_ran_a_program(report):
    data = report.check("bcc_load").data
    assert data["execs_seen"] >= 1
    assert data["compile_load_s"] > 0


def test_cgroup_layout_matches_proc_mounts(report):
    mounts = Path("/proc/mounts").read_text().split("\n")
    has_v1 = any(len(line.split()) > 2 and line.split()[2] == "cgroup" for line in mounts)
    check = report.check("cgroup_layout")
    assert check.data["kind"] == ("hybrid" if has_v1 else "v2")
    assert check.data["controllers"]["memory"] == ("v1" if has_v1 else "v2")


def test_psi_matches_proc_pressure(report):
    try:
        Path("/proc/pressure/memory").read_text()
        expected = "ok"
    except FileNotFoundError:
        expected = "unsupported"
    except OSError:
        expected = "missing"
    assert report.check("psi").status == expected
    if expected == "ok":
        assert report.check("psi_cgroup").status == "ok"


def test_sched_ext_matches_kernel_config(report):
    config = _kernel_config_text()
    if not config:
        pytest.skip("/proc/config.gz unreadable: nothing independent to compare with")
    built = "CONFIG_SCHED_CLASS_EXT=y" in config
    assert report.check("sched_ext").status == ("ok" if built else "unsupported")


def test_kprobes_match_kernel_config(report):
    config = _kernel_config_text()
    if not config:
        pytest.skip("/proc/config.gz unreadable: nothing independent to compare with")
    built = "CONFIG_KPROBES=y" in config
    assert report.check("kprobes").status == ("ok" if built else "unsupported")


def test_memcg_struct_ops_matches_a_raw_byte_search(report):
    """A crude search of the whole blob: absent bytes must mean unsupported."""
    raw = Path("/sys/kernel/btf/vmlinux").read_bytes()
    status = report.check("memcg_bpf_struct_ops").status
    if b"memcg_bpf_ops\0" not in raw:
        assert status == "unsupported"
    else:
        assert status in ("ok", "unsupported")  # the name may belong to a non-struct type


def test_nvml_matches_the_presence_of_libnvidia_ml(report):
    check = report.check("nvml")
    if ctypes.util.find_library("nvidia-ml") is None:
        assert check.status == "missing"
        assert "libnvidia-ml.so.1 not found" in check.detail
    else:
        assert check.status in ("ok", "missing")


def test_headers_status_matches_utsrelease(report):
    check = report.check("kernel_headers")
    if check.status in ("ok", "warning"):
        assert (check.status == "ok") == (check.data["headers_release"] == check.data["running_release"])


def test_probing_leaves_no_cgroup_behind(report):
    # the probe is <v2 root>/agentcg-doctor-<pid of the prober>: this process (the report fixture)
    name = f"agentcg-doctor-{os.getpid()}"
    leftovers = [root / name for root in (Path("/sys/fs/cgroup"), Path("/sys/fs/cgroup/unified"))
                 if (root / name).exists()]
    assert leftovers == []


def test_report_is_json_and_typed(report):
    data = json.loads(json.dumps(report.to_dict()))
    assert data["core_ok"] is True
    assert [c["name"] for c in data["checks"]] == list(CHECK_NAMES)
    assert all(c["status"] in ("ok", "warning", "missing", "unsupported") for c in data["checks"])
    assert all(c.fix for c in report.checks if c.status in ("missing", "unsupported"))


def test_unknown_names_are_refused(report):
    with pytest.raises(InvalidInput, match="no check named 'nope'"):
        report.check("nope")
    with pytest.raises(InvalidInput, match="unknown doctor check nope"):
        probe_host(only=["psi", "nope"])
    with pytest.raises(InvalidInput, match="status 'fine'"):
        Check("x", "fine", "")


def test_a_partial_report_is_not_core_ok():
    partial = probe_host(only=["kernel", "btf"])
    assert [c.name for c in partial.checks] == ["kernel", "btf"]
    assert not partial.core_ok
    assert set(partial.core_failures) == set(CORE_CHECKS) - {"btf"}


def test_require_skips_with_the_fix(monkeypatch):
    fake = HostReport(checks=(Check("kprobes", "unsupported", "no kprobes here", "use another kernel"),
                              Check("kernel_headers", "warning", "nearest 6.1", "")), elapsed_s=0.0)
    monkeypatch.setattr(doctor_pytest, "host_report", lambda: fake)
    doctor_pytest.require("kernel_headers")  # a warning is usable
    with pytest.raises(pytest.skip.Exception, match=r"host lacks kprobes \(unsupported\): no kprobes "
                                                     r"here; fix: use another kernel"):
        doctor_pytest.require("kernel_headers", "kprobes")
