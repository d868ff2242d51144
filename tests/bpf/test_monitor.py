"""BpfMonitor on the real kernel: real cgroups, real processes, real tracepoints."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agentcg.bpf.events import (CgroupRemovedEvent, ExecEvent, ExitEvent, OomVictimEvent,
                                RssThresholdEvent)
from agentcg.errors import BpfError, InvalidInput

MiB = 2**20
PY = sys.executable


def drain(mon, predicate, timeout_s=5.0):
    """Events until one satisfies `predicate` (returned last) or the timeout passes."""
    seen = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        seen += mon.poll(0.05)
        if any(predicate(e) for e in seen):
            return seen
    return seen


def test_300mb_allocation_shows_peak_of_at_least_300mb(monitor_with_faults, make_cgroup):
    cg = make_cgroup()
    monitor_with_faults.watch(cg.id)
    try:
        cg.run([PY, "-c", "b = bytearray(300 * 2**20); b[::4096] = b'x' * len(b[::4096])"], check=True)
        c = monitor_with_faults.counters(cg.id)
        assert c.rss_peak_bytes >= 300 * 10**6
        assert c.rss_bytes < c.rss_peak_bytes  # the process is gone; its RSS went with it
        assert c.page_faults > 300 * 10**6 // 4096 // 2  # bytearray touches every page
    finally:
        monitor_with_faults.forget(cg.id)


def test_rss_threshold_event_once_per_crossing_and_rearm(monitor_with_faults, make_cgroup):
    cg = make_cgroup()
    monitor_with_faults.watch(cg.id, rss_threshold_bytes=100 * MiB)
    try:
        script = ("import sys\nfor _ in range(3):\n    b = bytearray(150 * 2**20); del b\n")
        cg.run([PY, "-c", script], check=True)
        events = drain(monitor_with_faults, lambda e: False, timeout_s=0.3)
        crossings = [e for e in events if isinstance(e, RssThresholdEvent) and e.cgroup_id == cg.id]
        # freed below the threshold in between: re-armed, so one event per allocation
        assert len(crossings) == 3
        assert all(e.rss_bytes >= e.threshold_bytes == 100 * MiB for e in crossings)
        assert all(e.monotonic_s <= time.monotonic() for e in crossings)
        monitor_with_faults.set_rss_threshold(cg.id, None)
        cg.run([PY, "-c", "b = bytearray(150 * 2**20)"], check=True)
        assert not [e for e in drain(monitor_with_faults, lambda e: False, 0.2) if isinstance(e, RssThresholdEvent)]
    finally:
        monitor_with_faults.forget(cg.id)


def test_rss_threshold_rearms_only_clearly_below(monitor_with_faults, make_cgroup):
    """RSS that dips just under the threshold (above 7/8 of it) and rises again is one
    crossing; only a fall clearly below re-arms the event."""
    cg = make_cgroup()
    monitor_with_faults.watch(cg.id, rss_threshold_bytes=100 * MiB)
    try:
        script = ("a = bytearray(85 * 2**20)\n"
                  "b = bytearray(25 * 2**20); del b\n"     # ~119 MiB: fires; back to ~94 MiB
                  "b = bytearray(25 * 2**20); del b\n"     # ~119 MiB again: same crossing
                  "del a\n"                                 # ~9 MiB: re-armed
                  "a = bytearray(100 * 2**20)\n")           # ~109 MiB: fires again
        cg.run([PY, "-c", script], check=True)
        events = drain(monitor_with_faults, lambda e: False, timeout_s=0.3)
        crossings = [e for e in events if isinstance(e, RssThresholdEvent) and e.cgroup_id == cg.id]
        assert len(crossings) == 2, crossings
    finally:
        monitor_with_faults.forget(cg.id)


def test_fork_storm_stays_accounted_and_exec_carries_ppid(monitor, make_cgroup):
    cg = make_cgroup()
    monitor.watch(cg.id)
    try:
        shell = cg.popen(["/bin/sh", "-c", "for i in $(seq 150); do /bin/true & done; wait; exit 7"])
        monitor.watch_pid(shell.pid, cg.id)
        assert shell.wait(timeout=30) == 7
        events = drain(monitor, lambda e: isinstance(e, ExitEvent) and e.pid == shell.pid)
        c = monitor.counters(cg.id)
        assert c.forks >= 150 and c.execs >= 150 and c.exits >= 151
        trues = [e for e in events if isinstance(e, ExecEvent) and e.filename == "/bin/true"]
        assert len(trues) == 150
        assert {e.ppid for e in trues} == {shell.pid}
        assert all(e.cgroup_id == cg.id for e in trues)
        final = [e for e in events if isinstance(e, ExitEvent) and e.pid == shell.pid]
        assert final[0].exit_code is None and final[0].signal is None  # exit_codes not loaded
    finally:
        monitor.forget(cg.id)


def test_exit_codes_concern_reports_the_exit_status(make_cgroup):
    from agentcg.bpf.monitor import BpfMonitor

    if os.geteuid() != 0:
        pytest.skip("loading BPF programs needs root")
    with pytest.raises(InvalidInput, match="needs the concern process"):
        BpfMonitor(concerns=("exit_codes",))
    with BpfMonitor(concerns=("process", "exit_codes")) as mon:
        cg = make_cgroup()
        mon.watch(cg.id)
        proc = cg.popen(["/bin/sh", "-c", "exit 7"])
        assert proc.wait(timeout=10) == 7
        events = drain(mon, lambda e: isinstance(e, ExitEvent) and e.pid == proc.pid)
        final = [e for e in events if isinstance(e, ExitEvent) and e.pid == proc.pid]
        assert final[0].exit_code == 7 and final[0].signal is None
        mon.forget(cg.id)
        assert set(mon.live_entries().values()) == {0}


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL, signal.SIGSEGV])
def test_exit_by_signal_is_reported_with_that_signal(monitor, make_cgroup, sig):
    cg = make_cgroup()
    monitor.watch(cg.id)
    try:
        proc = cg.popen(["/bin/sleep", "30"])
        drain(monitor, lambda e: isinstance(e, ExecEvent) and e.pid == proc.pid)
        proc.send_signal(sig)
        proc.wait(timeout=10)
        events = drain(monitor, lambda e: isinstance(e, ExitEvent) and e.pid == proc.pid)
        exit_event = [e for e in events if isinstance(e, ExitEvent) and e.pid == proc.pid][0]
        assert exit_event.signal == sig and exit_event.exit_code is None
    finally:
        monitor.forget(cg.id)


_KILL_WORKER_THREAD = """
import signal, threading
worker = threading.Thread(target=threading.Event().wait, daemon=True)
worker.start()
signal.pthread_kill(worker.ident, signal.SIGTERM)  # tgkill(pid, worker tid): not the leader
threading.Event().wait(30)
"""


def test_fatal_signal_sent_to_a_worker_thread_is_reported_with_that_signal(monitor, make_cgroup):
    """signal_generate sees the worker's thread id; the signal must still be kept for its process."""
    cg = make_cgroup()
    monitor.watch(cg.id)
    try:
        proc = cg.popen([PY, "-c", _KILL_WORKER_THREAD])
        assert proc.wait(timeout=10) == -signal.SIGTERM
        events = drain(monitor, lambda e: isinstance(e, ExitEvent) and e.pid == proc.pid)
        exit_event = [e for e in events if isinstance(e, ExitEvent) and e.pid == proc.pid][0]
        assert exit_event.signal == signal.SIGTERM and exit_event.exit_code is None
        # Whichever thread exits last reports: its ppid is the process's parent (unknown here:
        # the child joined the cgroup at exec), never the process itself.
        assert exit_event.ppid in (0, os.getpid())
        assert monitor.live_entries()["exits"] == 0  # nothing left behind under the thread's id
    finally:
        monitor.forget(cg.id)
    assert monitor.live_entries()["exits"] == 0


_TWO_LOOPS_ON_ONE_CPU = (
    "import os, time\n"
    "os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})\n"
    "child = os.fork()\n"
    "t = time.process_time()\n"
    "while time.process_time() - t < 0.2: pass\n"
    "if child: os.waitpid(child, 0)\n"
    "else: os._exit(0)\n")


def test_cpu_time_and_runq_latency_of_a_busy_loop(monitor, make_cgroup):
    cg = make_cgroup()
    monitor.watch(cg.id)
    try:
        # two busy loops sharing one CPU, so each must wait on the run queue: a lone loop on
        # an idle host may never be switched out, and then has no wait to count
        cg.run([PY, "-c", _TWO_LOOPS_ON_ONE_CPU], check=True)
        c = monitor.counters(cg.id)
        assert 0.35 <= c.cpu_s <= 5
        assert c.runq_samples > 0 and sum(c.runq_histogram) == c.runq_samples
        assert 0 < c.runq_latency_p50_s <= c.runq_latency_p99_s
    finally:
        monitor.forget(cg.id)


def test_direct_io_bytes_are_charged_to_the_issuing_cgroup(monitor, make_cgroup, tmp_path):
    cg = make_cgroup()
    monitor.watch(cg.id)
    target = Path("/var/tmp") / f"agentcg-test-bpf-{os.getpid()}.bin"
    try:
        done = cg.run(["dd", "if=/dev/zero", f"of={target}", "bs=1M", "count=8", "oflag=direct"],
                      capture_output=True)
        if done.returncode != 0:
            pytest.skip(f"O_DIRECT is not supported on /var/tmp here: {done.stderr.decode().strip()}")
        cg.run(["dd", f"if={target}", "of=/dev/null", "bs=1M", "iflag=direct"], check=True, capture_output=True)
        c = monitor.counters(cg.id)
        assert c.block_write_bytes >= 8 * MiB
        assert c.block_read_bytes >= 8 * MiB
        dev = max(c.block_devices, key=lambda d: d.write_bytes)
        assert dev.write_ios > 0 and dev.write_latency_s > 0
        assert os.major(os.stat(target).st_dev) == dev.major
    finally:
        target.unlink(missing_ok=True)
        monitor.forget(cg.id)


def test_forget_leaves_no_map_entry(monitor_with_faults, make_cgroup):
    before = monitor_with_faults.live_entries()
    cg = make_cgroup()
    monitor_with_faults.watch(cg.id, rss_threshold_bytes=10 * MiB)
    cg.run(["/bin/sh", "-c", f"{PY} -c 'b = bytearray(20 * 2**20)' & /bin/true; wait"], check=True)
    monitor_with_faults.poll(0)
    during = monitor_with_faults.live_entries()
    assert during["watched"] == before["watched"] + 1 and during["counters"] == before["counters"] + 1
    final = monitor_with_faults.forget(cg.id)
    assert final.execs >= 2 and final.rss_peak_bytes >= 20 * MiB
    assert monitor_with_faults.live_entries() == before
    with pytest.raises(InvalidInput, match="not watched"):
        monitor_with_faults.counters(cg.id)


def test_removed_cgroup_entries_are_deleted_and_final_counters_kept(monitor, make_cgroup):
    cg = make_cgroup()
    monitor.watch(cg.id)
    cg.run(["/bin/true"], check=True)
    cgroup_id = cg.id
    cg.remove()
    events = drain(monitor, lambda e: isinstance(e, CgroupRemovedEvent) and e.cgroup_id == cgroup_id)
    assert any(isinstance(e, CgroupRemovedEvent) for e in events)
    assert cgroup_id not in monitor.watched()
    assert monitor.counters(cgroup_id).execs == 1
    entries = monitor.live_entries()
    assert entries["watched"] == entries["counters"] == len(monitor.watched())
    assert monitor.forget(cgroup_id).execs == 1


def test_oom_victim_and_reclaim_in_a_v1_memory_cgroup(monitor, make_cgroup):
    """Hybrid hosts only: the memory limit is a v1 memcg (a pure-v2 host would use memory.max)."""
    memory_root = Path("/sys/fs/cgroup/memory")
    if not (memory_root / "memory.limit_in_bytes").exists():
        pytest.skip("no cgroup v1 memory controller on this host")
    cg = make_cgroup()
    memcg = memory_root / cg.path.name
    memcg.mkdir()
    try:
        (memcg / "memory.limit_in_bytes").write_text(str(64 * MiB))
        if (memcg / "memory.memsw.limit_in_bytes").exists():
            (memcg / "memory.memsw.limit_in_bytes").write_text(str(64 * MiB))
        monitor.watch(cg.id)

        def enter():
            cg.enter()
            (memcg / "cgroup.procs").write_text("0")

        proc = subprocess.Popen([PY, "-c", "b = bytearray(256 * 2**20)"], preexec_fn=enter)
        assert proc.wait(timeout=30) == -signal.SIGKILL
        events = drain(monitor, lambda e: isinstance(e, OomVictimEvent) and e.pid == proc.pid)
        victims = [e for e in events if isinstance(e, OomVictimEvent) and e.pid == proc.pid]
        assert victims and victims[0].cgroup_id == cg.id and victims[0].rss_bytes > 0
        c = monitor.counters(cg.id)
        assert c.oom_kills == 1
        assert c.reclaim_count > 0 and c.reclaim_s > 0
    finally:
        monitor.forget(cg.id)
        deadline = time.monotonic() + 10
        while (memcg / "cgroup.procs").read_text().strip() and time.monotonic() < deadline:
            time.sleep(0.01)
        memcg.rmdir()


def test_bad_input_is_refused(monitor, make_cgroup):
    with pytest.raises(InvalidInput, match="positive integer"):
        monitor.watch(-1)
    cg = make_cgroup()
    with pytest.raises(InvalidInput, match="call watch"):
        monitor.watch_pid(os.getpid(), cg.id)
    monitor.watch(cg.id)
    try:
        with pytest.raises(InvalidInput, match="rss_threshold_bytes"):
            monitor.set_rss_threshold(cg.id, 0)
        with pytest.raises(InvalidInput, match="does not exist"):
            monitor.watch_pid(2**22 + 12345, cg.id)
    finally:
        monitor.forget(cg.id)


def test_unknown_concern_and_closed_monitor():
    from agentcg.bpf.monitor import BpfMonitor

    with pytest.raises(InvalidInput, match="unknown"):
        BpfMonitor(concerns=("network",))
    with pytest.raises(InvalidInput, match="faults needs the concern process"):
        BpfMonitor(concerns=("memory", "faults"))
    if os.geteuid() != 0:
        pytest.skip("loading BPF programs needs root")
    mon = BpfMonitor(concerns=("process",))
    mon.close()
    mon.close()
    with pytest.raises(BpfError, match="closed"):
        mon.watch(1)


def test_stats_report_no_losses(monitor):
    stats = monitor.stats()
    assert stats.ringbuf_full == 0 and stats.decode_errors == 0
    assert set(stats.map_full.values()) == {0}
    assert {p.tracepoint for p in stats.programs} >= {"sched:sched_process_exit", "oom:mark_victim"}
    # the per-fault and per-switch programs are opt-in; the hot ones are raw tracepoints
    assert not ({"kmem:rss_stat", "exceptions:page_fault_user", "sched:sched_switch", "sched:sched_wakeup"}
                & {p.tracepoint for p in stats.programs})
    raw = {p.tracepoint for p in stats.programs if p.raw}
    assert raw >= {"sched:sched_process_exec", "sched:sched_process_exit", "task:task_newtask"}


def _state(pid: int) -> str:
    return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]


def test_stop_at_exec_holds_the_process_until_sigcont(monitor, make_cgroup, tmp_path):
    """With stop_at_exec the kernel stops the exec'ing process before its first instruction:
    it has not written its marker file while stopped, and runs to completion after SIGCONT."""
    import signal as signals

    cg = make_cgroup()
    monitor.watch(cg.id, stop_at_exec=True)
    marker = tmp_path / "ran"
    try:
        proc = cg.popen(["/usr/bin/touch", str(marker)])
        events = drain(monitor, lambda e: isinstance(e, ExecEvent) and e.pid == proc.pid)
        exec_event = [e for e in events if isinstance(e, ExecEvent) and e.pid == proc.pid][0]
        assert exec_event.stopped
        deadline = time.monotonic() + 5
        while _state(proc.pid) != "T" and time.monotonic() < deadline:
            time.sleep(0.005)
        assert _state(proc.pid) == "T"
        time.sleep(0.1)
        assert not marker.exists()  # stopped before touch ran
        os.kill(proc.pid, signals.SIGCONT)
        assert proc.wait(timeout=10) == 0
        assert marker.exists()
        # without the flag nothing is stopped
        monitor.watch(cg.id, stop_at_exec=False)
        plain = cg.popen(["/bin/true"])
        assert plain.wait(timeout=10) == 0
        events = drain(monitor, lambda e: isinstance(e, ExecEvent) and e.pid == plain.pid)
        assert not [e for e in events if isinstance(e, ExecEvent) and e.pid == plain.pid][0].stopped
    finally:
        monitor.forget(cg.id)


def test_a_child_forked_from_a_big_parent_is_not_charged_its_parents_pages(monitor_with_faults, make_cgroup):
    """A child joins the watched cgroup before exec, while its mm is still a copy of the
    (big) parent's: eBPF RSS must count only what it gains there, not the parent's pages,
    and an exec'd program's memory all counts. Without the base rule this cgroup would show
    the parent's ~256 MiB."""
    ballast = bytearray(256 * MiB)   # make the spawning process big whatever ran before
    for i in range(0, len(ballast), 4096):
        ballast[i] = 1
    cg = make_cgroup()
    monitor_with_faults.watch(cg.id)
    try:
        assert cg.run(["/bin/true"]).returncode == 0
        assert monitor_with_faults.counters(cg.id).rss_peak_bytes < 32 * MiB
        # a forked child that never execs is charged its own growth
        script = "import os\nb = bytearray(120 * 2**20)\npid = os.fork()\n" \
                 "if pid == 0:\n    c = bytearray(100 * 2**20)\n    os._exit(0)\nos.waitpid(pid, 0)\n"
        before = monitor_with_faults.counters(cg.id).rss_peak_bytes
        assert cg.run([PY, "-c", script]).returncode == 0
        peak = monitor_with_faults.counters(cg.id).rss_peak_bytes
        assert peak >= 220 * MiB, peak          # python's 120 MiB plus the child's own 100 MiB
        assert peak < 220 * MiB + 120 * MiB, peak  # not the parent's 120 MiB a second time
        assert before < 32 * MiB
    finally:
        monitor_with_faults.forget(cg.id)
        del ballast
