"""`require(...)` for tests: skip, with the doctor's detail and fix, when this host lacks a
feature. The host is probed once per test process."""
from __future__ import annotations

import functools

import pytest

from agentcg.controller.doctor import HostReport, probe_host


@functools.lru_cache(maxsize=1)
def host_report() -> HostReport:
    return probe_host()


def require(*names: str) -> None:
    """pytest.skip unless every named doctor check is usable (ok or warning)."""
    report = host_report()
    for name in names:
        check = report.check(name)
        if not check.usable:
            fix = f"; fix: {check.fix}" if check.fix else ""
            pytest.skip(f"host lacks {name} ({check.status}): {check.detail}{fix}")
