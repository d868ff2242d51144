"""The cgroup layer on this host's real kernel (hybrid here, pure v2 in production).
Every cgroup lives below the `cgroup_tree` fixture's temporary root."""
from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import pytest

from agentcg.controller.cgroup import UNLIMITED
from agentcg.errors import CgroupExists, CgroupGone, ControllerMissing, InvalidInput
from testutil import wait_until

MiB = 1 << 20




def _proc_stat(pid: int) -> tuple[str, int]:
    """(state letter, utime+stime in ticks) from /proc/<pid>/stat."""
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return fields[0], int(fields[11]) + int(fields[12])


def test_create_nested_list_and_remove(cgroup_tree):
    cgroup_tree.create("sb1/tools/call-1")
    cgroup_tree.create("sb1/tools/call-2")
    assert cgroup_tree.children() == ["sb1"]
    assert cgroup_tree.children("sb1/tools") == ["call-1", "call-2"]
    with pytest.raises(CgroupExists):
        cgroup_tree.create("sb1/tools/call-1")
    cgroup_tree.create("sb1/tools/call-1", exist_ok=True)
    assert cgroup_tree.cgroup_id("sb1/tools/call-1") == os.stat(cgroup_tree.cgroup_dir("sb1/tools/call-1")).st_ino
    cgroup_tree.remove("sb1")
    assert not cgroup_tree.exists("sb1")
    for hierarchy_dir in cgroup_tree._hierarchy_dirs("sb1"):
        assert not hierarchy_dir.exists(), hierarchy_dir
    with pytest.raises(CgroupGone):
        cgroup_tree.remove("sb1")
    with pytest.raises(CgroupGone):
        cgroup_tree.pids("sb1")


@pytest.mark.parametrize("bad", ["", "a/../b", "..", "a//b", "/abs", "a b", "x" * 65, "a/./b"])
def test_bad_names_are_refused(cgroup_tree, bad):
    with pytest.raises(InvalidInput):
        cgroup_tree.create(bad)


def test_bad_values_are_refused(cgroup_tree):
    cgroup_tree.create("v")
    with pytest.raises(InvalidInput):
        cgroup_tree.set_memory("v", max=-1)
    with pytest.raises(InvalidInput):
        cgroup_tree.set_memory("v", max="64M")
    with pytest.raises(InvalidInput):
        cgroup_tree.set_cpu("v", weight=0)
    with pytest.raises(InvalidInput):
        cgroup_tree.set_cpu("v", max_s=0.0)
    with pytest.raises(InvalidInput):
        cgroup_tree.set_pids_max("v", 1.5)
    with pytest.raises(InvalidInput):
        cgroup_tree.spawn("v", "/bin/true")
    with pytest.raises(CgroupGone):
        cgroup_tree.set_memory("missing", max=MiB)


def test_spawn_joins_every_hierarchy_before_exec(cgroup_tree):
    cgroup_tree.create("sb/call")
    proc = cgroup_tree.spawn("sb/call", ["cat", "/proc/self/cgroup"], stdout=subprocess.PIPE, text=True)
    out, _ = proc.communicate(timeout=10)
    assert proc.returncode == 0
    expected = f"/{cgroup_tree.root}/sb/call"
    lines = dict(line.split(":", 2)[1:] for line in out.splitlines())
    assert lines[""] == expected  # the v2 tree
    if cgroup_tree.kind == "hybrid":
        joined = [c for c in ("memory", "cpu", "cpuacct", "pids", "freezer") if c in cgroup_tree.v1_mounts]
        assert {"memory", "cpu", "pids"} <= set(joined)
        for controller in joined:
            assert lines[controller] == expected, (controller, out)
        if "freezer" not in joined:  # Linux 5.2+: frozen through the v2 tree, v1 freezer untouched
            assert lines["freezer"] != expected


def test_attach_moves_an_existing_process(cgroup_tree):
    cgroup_tree.create("att")
    proc = subprocess.Popen(["sleep", "30"])
    try:
        cgroup_tree.attach("att", proc.pid)
        assert cgroup_tree.pids("att") == [proc.pid]
        assert cgroup_tree.is_populated("att")
    finally:
        proc.kill()
        proc.wait()
    with pytest.raises(CgroupGone):
        cgroup_tree.attach("att", proc.pid)  # reaped: no such process


def test_process_past_memory_max_is_oom_killed_and_counted(cgroup_tree):
    cgroup_tree.create("oom")
    cgroup_tree.set_memory("oom", max=48 * MiB)
    proc = cgroup_tree.spawn("oom", [sys.executable, "-c", "x = b'\\1' * (256 << 20)"])
    assert proc.wait(timeout=30) == -9
    events = cgroup_tree.memory_events("oom")
    assert events.oom_kill >= 1 and events.max >= 1, events
    assert 40 * MiB <= cgroup_tree.memory_peak("oom") <= 48 * MiB
    cgroup_tree.set_memory("oom", max=UNLIMITED)


def test_limits_land_in_the_kernel(cgroup_tree):
    cgroup_tree.create("lim")
    cgroup_tree.set_memory("lim", max=64 * MiB, low=8 * MiB)
    cgroup_tree.set_cpu("lim", weight=50, max_s=0.05, period_s=0.1)
    cgroup_tree.set_pids_max("lim", 32)
    if cgroup_tree.kind == "hybrid":
        read = lambda ctrl, name: (cgroup_tree.cgroup_dir("lim", ctrl) / name).read_text().strip()
        assert read("memory", "memory.limit_in_bytes") == str(64 * MiB)
        assert read("memory", "memory.soft_limit_in_bytes") == str(8 * MiB)
        assert read("cpu", "cpu.shares") == "512"
        assert (read("cpu", "cpu.cfs_quota_us"), read("cpu", "cpu.cfs_period_us")) == ("50000", "100000")
        assert read("pids", "pids.max") == "32"
        with pytest.raises(ControllerMissing, match="memory.high"):
            cgroup_tree.set_memory("lim", high=32 * MiB)
    else:
        read = lambda name: (cgroup_tree.cgroup_dir("lim") / name).read_text().strip()
        assert read("memory.max") == str(64 * MiB)
        assert read("cpu.max") == "50000 100000"
        assert read("pids.max") == "32"
    cgroup_tree.set_cpu("lim", max_s=UNLIMITED)
    cgroup_tree.set_pids_max("lim", UNLIMITED)
    # pids.max is enforced: with 3 allowed, the process itself plus two children fit
    cgroup_tree.set_pids_max("lim", 3)
    code = ("import os, time\nok = 0\nfor _ in range(6):\n    try:\n        pid = os.fork()\n"
            "    except OSError:\n        continue\n    if pid == 0:\n        time.sleep(5)\n        os._exit(0)\n"
            "    ok += 1\nprint(ok)\n")
    proc = cgroup_tree.spawn("lim", [sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "2"
        assert len(cgroup_tree.pids("lim")) == 3
    finally:
        cgroup_tree.kill("lim")
        proc.communicate(timeout=10)


def test_readings_are_typed(cgroup_tree):
    cgroup_tree.create("read")
    proc = cgroup_tree.spawn("read", [sys.executable, "-c", "x = b'\\1' * (20 << 20); sum(range(3_000_000))"])
    assert proc.wait(timeout=30) == 0
    stat = cgroup_tree.cpu_stat("read")
    assert isinstance(stat.usage_s, float) and stat.usage_s > 0.01
    assert stat.user_s + stat.system_s <= stat.usage_s * 1.5 + 0.02
    assert cgroup_tree.memory_peak("read") >= 20 * MiB
    assert isinstance(cgroup_tree.memory_current("read"), int)
    mstat = cgroup_tree.memory_stat("read")
    assert all(isinstance(v, int) for v in mstat.fields.values())
    pressure = cgroup_tree.pressure("read", "cpu")
    assert pressure.some.total_s >= 0.0 and isinstance(pressure.some.avg10, float)


def test_freeze_and_thaw_change_process_state(cgroup_tree):
    cgroup_tree.create("fz")
    proc = cgroup_tree.spawn("fz", ["sh", "-c", "while :; do :; done"])
    try:
        assert wait_until(lambda: _proc_stat(proc.pid)[1] > 0, timeout_s=5.0)
        cgroup_tree.freeze("fz")
        assert cgroup_tree.is_frozen("fz")
        state, ticks = _proc_stat(proc.pid)
        time.sleep(0.3)
        assert _proc_stat(proc.pid) == (state, ticks) and state != "R"
        cgroup_tree.thaw("fz")
        assert not cgroup_tree.is_frozen("fz")
        assert wait_until(lambda: _proc_stat(proc.pid)[1] > ticks, timeout_s=5.0)
    finally:
        cgroup_tree.kill("fz")
        proc.wait(timeout=10)


def test_kill_empties_a_cgroup_tree(cgroup_tree):
    cgroup_tree.create("k/a")
    cgroup_tree.create("k/b")
    procs = [cgroup_tree.spawn(p, ["sh", "-c", "sleep 60 & exec sleep 60"]) for p in ("k", "k/a", "k/b")]
    assert wait_until(lambda: len(cgroup_tree.pids("k/b")) == 2, timeout_s=5.0)
    cgroup_tree.kill("k")
    assert [p.wait(timeout=10) for p in procs] == [-9, -9, -9]
    assert wait_until(lambda: not cgroup_tree.is_populated("k"), timeout_s=5.0)
    assert cgroup_tree.pids("k") == cgroup_tree.pids("k/a") == []


def test_remove_kills_a_populated_cgroup(cgroup_tree):
    cgroup_tree.create("busy/inner")
    proc = cgroup_tree.spawn("busy/inner", ["sleep", "60"])
    cgroup_tree.remove("busy", timeout_s=5.0)
    assert proc.wait(timeout=10) == -9
    assert not cgroup_tree.exists("busy")


def test_memory_pressure_values_and_trigger_fire(cgroup_tree, tmp_path):
    """Page-cache thrashing: 30 MiB of anon memory plus re-reading a 96 MiB file under a
    48 MiB limit makes reclaim and refaults stall the task (no swap needed)."""
    data = tmp_path / "thrash.bin"
    with open(data, "wb") as f:
        for _ in range(96):
            f.write(os.urandom(MiB))
        f.flush()
        os.fsync(f.fileno())
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)  # charge pages to the reader
    cgroup_tree.create("psi")
    cgroup_tree.set_memory("psi", max=48 * MiB)
    code = ("import time\nx = b'\\1' * (30 << 20)\nend = time.time() + 12\n"
            f"while time.time() < end:\n    with open({str(data)!r}, 'rb') as f:\n"
            "        while f.read(1 << 20): pass\n")
    with cgroup_tree.pressure_trigger("psi", "memory", "some", stall_s=0.1, window_s=2.0) as trigger:
        proc = cgroup_tree.spawn("psi", [sys.executable, "-c", code])
        try:
            assert trigger.wait(timeout_s=12.0), "PSI trigger did not fire under memory pressure"
            pressure = cgroup_tree.pressure("psi", "memory")
            assert pressure.some.total_s >= 0.1
            assert pressure.some.avg10 > 0.0
        finally:
            proc.kill()
            proc.wait(timeout=10)


def test_fifty_cgroups_created_and_removed_concurrently_leave_nothing(cgroup_tree):
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        try:
            name = f"c{i}/leaf"
            cgroup_tree.create(name)
            if i % 5 == 0:
                proc = cgroup_tree.spawn(name, ["sleep", "30"])
                cgroup_tree.remove(f"c{i}")
                proc.wait(timeout=10)
            else:
                cgroup_tree.remove(f"c{i}")
        except BaseException as exc:  # collected and re-raised in the main thread
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(50)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert not errors, errors
    assert cgroup_tree.children() == []
    for base in cgroup_tree._hierarchy_bases():
        assert [p.name for p in base.iterdir() if p.is_dir()] == [], base
