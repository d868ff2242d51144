"""PSI parsing (formats copied from a 6.x kernel) and trigger argument checks; the live
trigger firing under real memory pressure is in test_cgroup_real.py."""
from __future__ import annotations

import pytest

from agentcg.controller.psi import (
    Pressure, PressureLine, PressureTrigger, has_cap_sys_resource, parse_pressure, read_pressure,
    validate_trigger,
)
from agentcg.errors import CgroupGone, InvalidInput


def test_parse_some_and_full():
    text = ("some avg10=12.51 avg60=4.07 avg300=0.93 total=3412009\n"
            "full avg10=10.02 avg60=3.11 avg300=0.70 total=2905112\n")
    assert parse_pressure(text) == Pressure(PressureLine(12.51, 4.07, 0.93, 3.412009),
                                            PressureLine(10.02, 3.11, 0.70, 2.905112))


def test_missing_full_line_reads_as_zero():
    assert parse_pressure("some avg10=0.00 avg60=0.00 avg300=0.00 total=15\n").full == PressureLine(0, 0, 0, 0)


@pytest.mark.parametrize("text", ["", "some avg10=x avg60=0 avg300=0 total=1", "half avg10=0", "some total=1"])
def test_malformed_pressure_is_refused(text):
    with pytest.raises(InvalidInput):
        parse_pressure(text)


def test_system_wide_pressure_file_reads():
    pressure = read_pressure("/proc/pressure/memory")
    assert pressure.some.total_s >= 0.0


def test_missing_file_is_gone(tmp_path):
    with pytest.raises(CgroupGone):
        read_pressure(tmp_path / "memory.pressure")
    with pytest.raises(CgroupGone):
        PressureTrigger(tmp_path / "memory.pressure", "some", 0.1, 2.0)


@pytest.mark.parametrize("kind,stall,window", [("most", 0.1, 2), ("some", 0, 2), ("some", 3, 2),
                                                ("some", 0.1, 0.1), ("full", 0.1, 11)])
def test_trigger_arguments_the_kernel_would_refuse(kind, stall, window):
    with pytest.raises(InvalidInput):
        validate_trigger(kind, stall, window)


def test_trigger_units():
    assert validate_trigger("some", 0.15, 1.0) == (150000, 1000000)


def test_unprivileged_window_is_explained(tmp_path):
    if has_cap_sys_resource():
        pytest.skip("this process has CAP_SYS_RESOURCE: any window is accepted")
    path = tmp_path / "memory.pressure"
    path.write_text("")
    with pytest.raises(InvalidInput, match="multiples of 2 s"):
        PressureTrigger(path, "some", 0.1, 1.0)


def test_trigger_on_system_pressure_is_pollable():
    with PressureTrigger("/proc/pressure/memory", "some", 0.5, 2.0) as trigger:
        assert trigger.fileno() >= 0
        assert trigger.wait(0.0) in (True, False)
    with pytest.raises(ValueError):
        trigger.fileno()
