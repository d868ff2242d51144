"""The doctor's result types: a `Check` per kernel feature and the `HostReport` of them.

Separate from the probes (`doctor`) so that the probe modules (`doctor_bpf`) and the
pytest helper (`doctor_pytest`) import these types without importing each other: the
imports go doctor_cli/doctor_pytest -> doctor -> doctor_bpf -> doctor_check.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from agentcg.errors import InvalidInput

OK, WARNING, MISSING, UNSUPPORTED = "ok", "warning", "missing", "unsupported"
STATUSES = (OK, WARNING, MISSING, UNSUPPORTED)

CHECK_NAMES = (
    "kernel", "bpf_syscall", "bpf_jit", "btf", "tracefs", "bcc", "bcc_load", "kernel_headers",
    "kprobes", "uprobes", "sched_ext", "memcg_bpf_struct_ops", "cgroup_layout",
    "cgroup_v2_freeze_kill", "psi", "psi_cgroup", "swap", "zswap", "nvml",
)
# Without these agentcg cannot run at all; `agentcg doctor` exits 1 when one is not usable.
CORE_CHECKS = ("bpf_syscall", "btf", "tracefs", "bcc_load", "cgroup_layout", "cgroup_v2_freeze_kill")

# cgroup.freeze came in Linux 5.2, cgroup.kill in 5.14; the ring buffer (bcc's
# BPF_RINGBUF_OUTPUT) in 5.8. Older kernels work partly, so they are a warning.
MIN_KERNEL = (5, 14)
SETUP_FIX = "bash scripts/host.sh setup"


@dataclass(frozen=True)
class Check:
    name: str
    status: str
    detail: str
    fix: str = ""
    data: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise InvalidInput(f"check {self.name}: status {self.status!r} is not one of {', '.join(STATUSES)}")
        object.__setattr__(self, "data", MappingProxyType(dict(self.data)))

    @property
    def usable(self) -> bool:
        return self.status in (OK, WARNING)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "status": self.status, "detail": self.detail,
                "fix": self.fix, "data": dict(self.data)}


@dataclass(frozen=True)
class HostReport:
    checks: tuple[Check, ...]
    elapsed_s: float

    def check(self, name: str) -> Check:
        for check in self.checks:
            if check.name == name:
                return check
        known = ", ".join(c.name for c in self.checks)
        raise InvalidInput(f"no check named {name!r} in this report (it has: {known})")

    def ok(self, name: str) -> bool:
        """True when the feature is usable: status ok, or warning (usable with a caveat)."""
        return self.check(name).usable

    @property
    def core_failures(self) -> tuple[str, ...]:
        present = {c.name: c for c in self.checks}
        return tuple(n for n in CORE_CHECKS if n not in present or not present[n].usable)

    @property
    def core_ok(self) -> bool:
        return not self.core_failures

    def to_dict(self) -> dict[str, Any]:
        return {"core_ok": self.core_ok, "core_failures": list(self.core_failures),
                "elapsed_s": round(self.elapsed_s, 3), "checks": [c.to_dict() for c in self.checks]}
