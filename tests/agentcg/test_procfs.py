"""agentcg.procfs on this host's real /proc, and on a fixture tree (for the odd shapes a
live host rarely shows: a comm with ") (" in it, a v1-only process, a broken file)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from testutil import wait_until

from agentcg.errors import InvalidInput, ProcessGone
from agentcg.procfs import PROC, ProcCgroup, ProcFs


def _free_pid() -> int:
    """A pid that no process has now (reaped child)."""
    child = subprocess.Popen(["/bin/true"])
    child.wait()
    return child.pid


# ---- real /proc --------------------------------------------------------------------
def test_stat_of_self_and_child_on_real_proc() -> None:
    me = PROC.stat(os.getpid())
    assert me.pid == os.getpid() and me.ppid == os.getppid() and me.state in "RS"
    assert PROC.stat("self").pid == os.getpid()
    child = subprocess.Popen(["/bin/sleep", "30"])
    try:
        # comm changes early in exec, argv is in place only once the new image is set up
        assert wait_until(lambda: PROC.cmdline(child.pid) == ["/bin/sleep", "30"])
        stat = PROC.stat(child.pid)
        assert (stat.comm, stat.ppid) == ("sleep", os.getpid())
        assert stat.start_ticks >= me.start_ticks
        assert PROC.is_alive(child.pid, stat.start_ticks)
        assert not PROC.is_alive(child.pid, stat.start_ticks + 1)   # a recycled pid is not the owner
        assert PROC.tids(child.pid) == [child.pid]
    finally:
        child.kill()
        child.wait()


def test_a_zombie_is_dead() -> None:
    child = subprocess.Popen(["/bin/true"])
    # not reaped yet: the kernel keeps /proc/<pid> with state Z until wait()
    assert wait_until(lambda: PROC.stat(child.pid).state == "Z")
    start = PROC.stat(child.pid).start_ticks
    assert not PROC.is_alive(child.pid)
    assert not PROC.is_alive(child.pid, start)
    assert PROC.cmdline(child.pid) == []
    child.wait()
    assert not PROC.is_alive(child.pid, start)


def test_gone_process_raises_process_gone() -> None:
    pid = _free_pid()
    for read in (PROC.stat, PROC.cgroups, PROC.status, PROC.cmdline, PROC.tids):
        with pytest.raises(ProcessGone) as info:
            read(pid)
        assert info.value.pid == pid and isinstance(info.value, ProcessLookupError)
    assert PROC.start_ticks(pid) is None and not PROC.is_alive(pid)


def test_cgroups_and_status_of_self_on_real_proc() -> None:
    cgroups = PROC.cgroups("self")
    text = Path("/proc/self/cgroup").read_text()
    assert len(cgroups) == len(text.splitlines()) and all(c.path.startswith("/") for c in cgroups)
    if "0::" in text:
        assert PROC.v2_cgroup("self") == next(l[3:] for l in text.splitlines() if l.startswith("0::"))
    status = PROC.status(os.getpid())
    assert status.uids[0] == os.getuid() and status.uids[1] == os.geteuid()
    assert status.gids[0] == os.getgid()
    assert set(os.getgroups()) - {os.getegid()} <= status.groups
    assert (status.cap_effective != 0) == (os.geteuid() == 0)


def test_bad_pid_is_invalid_input() -> None:
    for pid in (0, -1, True, "1/../2", 1.5):
        with pytest.raises(InvalidInput):
            PROC.stat(pid)  # type: ignore[arg-type]


def test_meminfo_and_text_on_real_proc() -> None:
    assert PROC.meminfo()["MemTotal"] > 64 * 1024 * 1024
    assert "cgroup" in PROC.text("filesystems")
    with pytest.raises(InvalidInput):
        PROC.text("../etc/passwd")


def test_write_oom_score_adj_on_a_child() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        PROC.write_oom_score_adj(500, child.pid)    # raising is allowed without privileges
        assert Path(f"/proc/{child.pid}/oom_score_adj").read_text().strip() == "500"
        with pytest.raises(InvalidInput):
            PROC.write_oom_score_adj(1001, child.pid)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()


# ---- fixture root ------------------------------------------------------------------
def _fixture(tmp_path: Path, pid: int, **files: str) -> ProcFs:
    directory = tmp_path / "proc" / str(pid)
    directory.mkdir(parents=True)
    for name, text in files.items():
        (directory / name).write_text(text)
    return ProcFs(tmp_path / "proc")


def test_fixture_comm_with_parentheses_and_spaces(tmp_path: Path) -> None:
    fields = ["S", "7"] + ["0"] * 17 + ["123456"] + ["0"] * 10
    procfs = _fixture(tmp_path, 42, stat=f"42 (a) (b c) {' '.join(fields)}\n")
    stat = procfs.stat(42)
    assert stat == (42, "a) (b c", "S", 7, 123456)
    assert procfs.is_alive(42, 123456) and not procfs.is_alive(43)


def test_fixture_zombie_state(tmp_path: Path) -> None:
    fields = ["Z", "1"] + ["0"] * 17 + ["99"]
    procfs = _fixture(tmp_path, 5, stat=f"5 (defunct) {' '.join(fields)}\n")
    assert procfs.stat(5).state == "Z" and not procfs.is_alive(5, 99)


def test_fixture_hybrid_cgroups(tmp_path: Path) -> None:
    procfs = _fixture(tmp_path, 9, cgroup="12:memory:/agentcg/s1/tools/c1\n"
                                          "4:cpu,cpuacct:/agentcg/s1\n"
                                          "1:name=systemd:/init.scope\n0::/\n")
    assert procfs.cgroups(9)[1] == ProcCgroup(4, ("cpu", "cpuacct"), "/agentcg/s1")
    assert procfs.v2_cgroup(9) == "/"
    assert procfs.v1_cgroup(9, "memory") == "/agentcg/s1/tools/c1"
    assert procfs.v1_cgroup(9, "pids") is None


def test_fixture_v1_only_has_no_v2_path(tmp_path: Path) -> None:
    procfs = _fixture(tmp_path, 9, cgroup="3:memory:/x\n")
    assert procfs.v2_cgroup(9) is None


def test_fixture_status(tmp_path: Path) -> None:
    procfs = _fixture(tmp_path, 8, status="Name:\tx\nUid:\t1000\t1000\t1000\t1000\n"
                                          "Gid:\t100\t100\t100\t100\nGroups:\t27 100 \n"
                                          "CapEff:\t0000000000000000\n")
    status = procfs.status(8)
    assert status.uids == (1000,) * 4 and status.gids == (100,) * 4
    assert status.groups == {27, 100} and status.cap_effective == 0


def test_fixture_broken_files_name_the_file(tmp_path: Path) -> None:
    procfs = _fixture(tmp_path, 3, stat="garbage", cgroup="no colons\n", status="Name:\tx\n")
    for read in (procfs.stat, procfs.cgroups, procfs.status):
        with pytest.raises(InvalidInput, match=str(tmp_path)):
            read(3)


def test_fixture_meminfo_in_bytes(tmp_path: Path) -> None:
    (tmp_path / "proc").mkdir()
    (tmp_path / "proc" / "meminfo").write_text("MemTotal:       2048 kB\nHugePages_Total:       3\n")
    assert ProcFs(tmp_path / "proc").meminfo() == {"MemTotal": 2048 * 1024, "HugePages_Total": 3}
