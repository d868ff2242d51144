"""The control core without a daemon: the event log, thresholds from the policy's
fractions, the memcg v1 threshold eventfd and the eBPF ring buffer's epoll fd on the real
kernel, and one ControlCore step over a real cgroup tree."""
from __future__ import annotations

import os
import select
import subprocess
import sys
import time

import pytest

from agentcg.controller.core import ControlCore, EventLog, Inputs, SandboxInput, CallInput, Thresholds
from agentcg.controller.core.thresholds import DRIFT_BYTES, call_threshold_bytes, needs_rearm, sandbox_thresholds
from agentcg.controller.enforce import Layout
from agentcg.errors import InvalidInput
from agentcg.policies.sandbox import GraduatedConfig

MiB = 1 << 20
GiB = 1 << 30
T = Thresholds.of(GraduatedConfig(throttle_at=0.8, freeze_at=0.9, kill_at=0.97, relax_below=0.7))


# ---- event log -----------------------------------------------------------------------
def test_event_log_pages_filters_and_counts_what_it_dropped():
    log = EventLog(capacity=16)
    for i in range(20):
        log.append("freeze" if i % 2 else "thaw", "A" if i < 10 else "B", f"c{i}", {"i": i})
    page = log.since(0)
    assert [e["seq"] for e in page["events"]] == list(range(5, 21)) and page["dropped"] == 4
    assert page["next_seq"] == 21
    assert log.since(21) == {"events": [], "next_seq": 21, "dropped": 0}
    only_b = log.since(0, sandbox="B")["events"]
    assert {e["sandbox"] for e in only_b} == {"B"} and len(only_b) == 10
    short = log.since(7, limit=3)
    assert [e["seq"] for e in short["events"]] == [7, 8, 9] and short["next_seq"] == 10 and short["dropped"] == 0
    with pytest.raises(InvalidInput):
        log.append("reboot", None, None)
    with pytest.raises(InvalidInput):
        log.since(-1)


# ---- thresholds ----------------------------------------------------------------------
@pytest.mark.parametrize("budget, scope, call, expected", [
    (None, 0, 0, None),                                         # no budget: nothing to arm
    (GiB, 0, 0, int(0.8 * GiB) + 1 + DRIFT_BYTES),              # a lone new call: throttle fraction
    (GiB, 500 * MiB, 100 * MiB, int(0.8 * GiB) + 1 - 400 * MiB + DRIFT_BYTES),   # the others hold 400 MiB
    (GiB, 850 * MiB, 450 * MiB, int(0.9 * GiB) + 1 - 400 * MiB + DRIFT_BYTES),   # past throttle: freeze next
    (GiB, 1000 * MiB, 600 * MiB, None),                          # past kill_at: the tick and PSI act
    (64 * MiB, 0, 0, int(0.8 * 64 * MiB) + 1 + DRIFT_BYTES),
])
def test_call_threshold_is_the_room_before_the_next_fraction(budget, scope, call, expected):
    got = call_threshold_bytes(budget, scope, call, T)
    assert got == expected or (expected is not None and abs(got - expected) <= 1)


def test_sandbox_thresholds_one_per_distinct_fraction():
    assert sandbox_thresholds(None, T) == ()
    assert sandbox_thresholds(1000, T) == (800, 900, 970)
    same = Thresholds.of(GraduatedConfig(throttle_at=0.9, freeze_at=0.9, kill_at=0.97, relax_below=0.7))
    assert sandbox_thresholds(1000, same) == (900, 970)
    assert needs_rearm(None, 100) and not needs_rearm(1000, 1010) and needs_rearm(1000, 1100)


# ---- the kernel's notifications ------------------------------------------------------
def _hold(tree, path, mib):
    return tree.spawn(path, [sys.executable, "-S", "-c",
                             f"import sys; b = bytearray({mib} << 20); print('ok', flush=True); sys.stdin.read()"],
                      stdin=subprocess.PIPE, stdout=subprocess.PIPE)


def test_memcg_usage_threshold_eventfd_fires_on_the_crossing(cgroup_tree):
    from agentcg.controller.cgroup.threshold import UsageThreshold
    from agentcg.errors import AgentcgError

    try:
        directory = cgroup_tree.cgroup_dir("", "memory")
    except AgentcgError:
        pytest.skip("no cgroup v1 memory hierarchy here (pure v2): memcg thresholds do not exist")
    cgroup_tree.create("sb")
    threshold = UsageThreshold(cgroup_tree.cgroup_dir("sb", "memory"), 48 * MiB)
    assert directory.is_dir()
    epoll = select.epoll()
    epoll.register(threshold.fileno(), select.EPOLLIN)
    proc = _hold(cgroup_tree, "sb", 64)
    try:
        assert proc.stdout.readline() == b"ok\n"
        assert epoll.poll(5), "no eventfd wake-up after crossing 48 MiB"
        count, read_s = threshold.read()
        assert count >= 1 and read_s <= time.monotonic()
        assert threshold.usage_bytes() >= 48 * MiB
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()
        proc.stdin.close()
        epoll.close()
        threshold.close()
    with pytest.raises(ValueError):
        UsageThreshold(cgroup_tree.cgroup_dir("sb", "memory"), 0)


def test_ring_buffer_fd_wakes_epoll_on_an_rss_threshold_event(cgroup_tree):
    pytest.importorskip("bcc", reason="bcc is not installed (Debian package python3-bpfcc)")
    from agentcg.bpf.events import RssThresholdEvent
    from agentcg.bpf.monitor import BpfMonitor

    cgroup_tree.create("sb")
    with BpfMonitor(concerns=("process", "faults")) as mon:   # RSS thresholds: the opt-in per-fault concern
        cgroup_id = cgroup_tree.cgroup_id("sb")
        mon.watch(cgroup_id, rss_threshold_bytes=32 * MiB)
        epoll = select.epoll()
        epoll.register(mon.fileno(), select.EPOLLIN)
        proc = _hold(cgroup_tree, "sb", 64)
        try:
            assert proc.stdout.readline() == b"ok\n"
            found = []
            deadline = time.monotonic() + 5
            while not found and time.monotonic() < deadline:
                if epoll.poll(1):                       # woken by the kernel, not by a poll interval
                    found = [e for e in mon.poll(0) if isinstance(e, RssThresholdEvent) and e.cgroup_id == cgroup_id]
            assert found, "the ring buffer's epoll fd never became readable for the threshold event"
            assert found[0].rss_bytes >= 32 * MiB and found[0].monotonic_s <= time.monotonic()
        finally:
            proc.kill()
            proc.wait()
            proc.stdout.close()
            proc.stdin.close()
            epoll.close()


# ---- one step of the core over a real tree ------------------------------------------------
def test_a_core_step_admits_defers_and_logs_on_a_real_tree(cgroup_tree):
    """Budget 256 MiB, 150 MiB held: a 50 MiB call is admitted, a 100 MiB one waits."""
    layout = Layout()
    for path in ("sb/agent", "sb/tools/run", "sb/tools/p1", "sb/tools/p2"):
        cgroup_tree.create(path)
    core = ControlCore(cgroup_tree, "agentcg", config=GraduatedConfig(lookahead_s=0), locate=layout.locate)
    proc = _hold(cgroup_tree, "sb/tools/run", 150)
    try:
        assert proc.stdout.readline() == b"ok\n"
        now = time.monotonic()
        core.add_pending("sb", "p1", "small", 50 * MiB, now)
        core.add_pending("sb", "p2", "large", 100 * MiB, now)
        inputs = Inputs((SandboxInput("sb", "sb", "normal", 256 * MiB),),
                        (CallInput("sb", "run", "build", "sb/tools/run", now - 1.0),), host_path="")
        step = core.step(inputs, now + 0.01)
        assert [key for key, _, _ in step.admitted] == [("sb", "p1")]
        assert [key for key, _ in step.deferred] == [("sb", "p2")] and ("sb", "p2") in core.pending
        assert step.snapshot.sandbox("sb").usage_bytes >= 150 * MiB
        kinds = [(e["kind"], e["call_id"]) for e in core.log.since(0)["events"]]
        assert ("admit", "p1") in kinds and ("admit_wait", "p2") in kinds
        if "memory.high" in cgroup_tree.capabilities:     # the admitted call's initial memory.high
            assert any(a.action.call_id == "p1" and a.ok for a in step.applied)
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()
        proc.stdin.close()


def test_local_mode_admits_through_the_same_core(cgroup_tree, tmp_path):
    """A ToolCallManager with a LocalControl (no daemon): a hinted call waits in begin()
    while the sandbox has no room, and starts once the holding call has ended."""
    import threading

    from agentcg.controller.core.local import LocalControl
    from agentcg.controller.toolcall import ToolCallManager

    control = LocalControl(cgroup_tree, "agentcg", budgets={"sb": 256 * MiB}, tick_s=0.05,
                           config=GraduatedConfig(lookahead_s=0, max_wait_s=30))
    mgr = ToolCallManager(cgroup_tree, records_path=tmp_path / "records.jsonl", state=tmp_path / "state",
                          grace_s=0.0, control=control)
    first = mgr.begin("sb", "build", ["build"], mem_hint_bytes=150 * MiB)
    holder = first.spawn([sys.executable, "-S", "-c", "import sys; b = bytearray(150 << 20); print('ok', flush=True); "
                          "sys.stdin.read()"], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert holder.stdout.readline() == b"ok\n"
    begun: dict = {}
    waiter = threading.Thread(target=lambda: begun.update(call=mgr.begin("sb", "pytest", ["pytest"],
                                                                        mem_hint_bytes=100 * MiB)))
    waiter.start()
    try:
        deadline = time.monotonic() + 10
        while not control.core.pending and time.monotonic() < deadline:
            time.sleep(0.01)
        assert [key[1] for key in control.core.pending] and not begun, "the hinted call must wait"
    finally:
        holder.stdin.close()
        holder.wait(10)
        holder.stdout.close()
        record = mgr.end(first, exit_code=0)
    waiter.join(30)
    second = begun["call"]
    assert second.extra["admission_wait_s"] > 0 and record.outcome == "ok"
    kinds = [e["kind"] for e in control.core.log.since(0)["events"] if e["call_id"] == second.call_id]
    assert kinds == ["admit_wait", "admit"]
    mgr.end(second, exit_code=0)
