"""The control core live in the daemon (real daemon subprocess, real cgroups and, where
loaded, real eBPF): admission waits for room, kernel threshold crossings wake the
daemon through its epoll, and every action lands in the event log (`events.since`)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading

import pytest

from agentcg.client import spawn_into
from agentcg.controller.daemon.testing import daemon_process, read_line
from testutil import wait_until

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the daemon creates cgroups: run the tests as root")

MiB = 1 << 20
HOLD = "import sys; b = bytearray({mib} << 20); print('held', flush=True); sys.stdin.read()"


def _hold(procs, mib):
    """A process in the call's cgroup that touches `mib` MiB and holds them until stdin closes."""
    proc = spawn_into(procs, [sys.executable, "-S", "-c", HOLD.format(mib=mib)], stdin=subprocess.PIPE,
                      stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def _release(proc):
    proc.stdin.close()
    proc.wait(10)
    proc.stdout.close()


def test_admission_waits_for_room_then_runs_the_hinted_call():
    """A sandbox of 256 MiB holds a 150 MiB call; a call declaring 100 MiB would pass 90%:
    its toolcall.begin waits (pending in `state`, counted in /metrics, an admit_wait event),
    and is answered once the first call ended; then it runs and is recorded."""
    with daemon_process(policy={"name": "agentcg", "tick_s": 0.1, "max_wait_s": 30, "lookahead_s": 0}) as d:
        d.result("sandbox.create", name="A", memory_budget_bytes=256 * MiB)
        first = d.result("toolcall.begin", sandbox="A", tool="build", mem_hint_bytes=150 * MiB)
        holder = _hold(first["cgroup_procs"], 150)
        answer: dict = {}

        def begin_second() -> None:
            with d.connect(60) as sock:
                sock.sendall(json.dumps({"v": 1, "id": 7, "op": "toolcall.begin", "args": {
                    "sandbox": "A", "tool": "pytest", "mem_hint_bytes": 100 * MiB}}).encode() + b"\n")
                answer.update(json.loads(read_line(sock)))

        waiter = threading.Thread(target=begin_second)
        waiter.start()
        try:
            assert wait_until(lambda: d.result("state")["pending_calls"], 10), "the hinted call waits for admission"
            pending = d.result("state")["pending_calls"][0]
            assert pending["sandbox"] == "A" and pending["tool"] == "pytest" and "waits for room" in pending["reason"]
            assert not answer, answer
            assert "agentcg_tool_calls_waiting 1.0" in d.metrics_text()
        finally:
            _release(holder)
            d.result("toolcall.end", call_id=first["call_id"], exit_code=0)
        waiter.join(30)
        assert answer.get("ok"), answer
        second = answer["result"]
        assert second["admission"]["waited_s"] > 0 and second["call_id"] != first["call_id"]
        proc = spawn_into(second["cgroup_procs"], ["true"])
        assert proc.wait(10) == 0
        record = d.result("toolcall.end", call_id=second["call_id"], exit_code=0)["record"]
        assert record["outcome"] == "ok" and record["mem_hint_bytes"] == 100 * MiB
        events = d.result("events.since", seq=0, sandbox="A")["events"]
        kinds = [e["kind"] for e in events if e["call_id"] == second["call_id"]]
        assert kinds == ["admit_wait", "admit"], events
        assert [e["kind"] for e in events if e["call_id"] == first["call_id"]][:1] == ["admit"]   # it fitted
        assert d.result("state")["pending_calls"] == []
        metrics = d.metrics_text()
        assert "agentcg_admission_wait_seconds_count" in metrics and "agentcg_tool_calls_waiting 0.0" in metrics


def test_a_client_that_leaves_while_waiting_leaves_no_call_behind():
    with daemon_process(policy={"name": "agentcg", "tick_s": 0.1}) as d:
        d.result("sandbox.create", name="A", memory_budget_bytes=64 * MiB)
        sock = d.connect(10)
        sock.sendall(json.dumps({"v": 1, "id": 1, "op": "toolcall.begin", "args": {
            "sandbox": "A", "tool": "big", "mem_hint_bytes": 200 * MiB}}).encode() + b"\n")
        assert wait_until(lambda: d.result("state")["pending_calls"], 10), "the call waits"
        sock.close()
        assert wait_until(lambda: not d.result("state")["running_calls"], 10), "the waiting call is discarded"
        assert d.result("state")["pending_calls"] == [] and d.records() == []


def test_events_since_pages_and_refuses_bad_input():
    """The event log of a freeze-then-kill: each action with its reason and reaction time."""
    hog = ("import time\nb = []\nwhile True:\n    b.append(bytearray(8 << 20))\n    time.sleep(0.01)\n")
    with daemon_process(policy={"name": "agentcg", "tick_s": 0.1}) as d:
        d.result("sandbox.create", name="A", memory_budget_bytes=256 * MiB)
        begun = d.result("toolcall.begin", sandbox="A", tool="hog")
        proc = spawn_into(begun["cgroup_procs"], [sys.executable, "-S", "-c", hog])
        try:
            assert wait_until(lambda: any(e["kind"] in ("freeze", "kill") for e in
                                   d.result("events.since", seq=0)["events"]), 30), "the policy acts"
        finally:
            d.request("toolcall.end", call_id=begun["call_id"], signal=9)
            proc.kill()
            proc.wait()
        log = d.result("events.since", seq=0)
        acted = [e for e in log["events"] if e["kind"] in ("freeze", "kill")]
        assert acted and all(e["sandbox"] == "A" and e["call_id"] == begun["call_id"] for e in acted)
        detail = acted[0]["detail"]
        assert detail["reason"] and detail["ok"] and detail["reaction_s"] >= 0
        assert detail["applied_monotonic_s"] >= detail["observed_monotonic_s"]
        seqs = [e["seq"] for e in log["events"]]
        assert seqs == sorted(seqs) and log["next_seq"] == seqs[-1] + 1 and log["dropped"] == 0
        later = d.result("events.since", seq=log["next_seq"])
        assert later["events"] == [] and later["next_seq"] == log["next_seq"]
        assert d.result("events.since", seq=0, sandbox="nobody")["events"] == []
        bad = d.request("events.since", seq=-1)
        assert not bad["ok"] and bad["error"]["code"] == "invalid_input"
        assert not d.request("events.since")["ok"]


def test_an_ebpf_threshold_crossing_wakes_the_daemon_and_the_freeze_follows_it():
    """eBPF on, tick 5 s, PSI off: only the kernel's RSS-threshold event can make the daemon
    act within the allocation. The call's threshold is armed at admission (80% of the
    sandbox's budget, less what the rest holds); the freeze it causes is timed from the
    kernel's timestamp of that crossing."""
    pytest.importorskip("bcc", reason="bcc is not installed (Debian package python3-bpfcc)")
    policy = {"name": "agentcg", "tick_s": 5.0, "throttle_at": 0.8, "freeze_at": 0.8, "kill_at": 0.99,
              "relax_below": 0.5, "lookahead_s": 0}
    with daemon_process(policy=policy, psi={"enabled": False},
                        ebpf={"mode": "on", "concerns": ["process", "memory", "faults"]}) as d:   # RSS thresholds: opt-in
        assert "ebpf-ringbuf-epoll" in d.result("state")["reaction"]
        d.result("sandbox.create", name="A", memory_budget_bytes=256 * MiB)
        begun = d.result("toolcall.begin", sandbox="A", tool="alloc")
        proc = spawn_into(begun["cgroup_procs"], [sys.executable, "-S", "-c", HOLD.format(mib=230)],
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            assert wait_until(lambda: any(e["kind"] == "freeze" for e in d.result("events.since", seq=0)["events"]),
                              4), d.result("events.since", seq=0)
        finally:
            proc.kill()
            proc.wait()
            proc.stdout.close()
            proc.stdin.close()
            d.request("toolcall.end", call_id=begun["call_id"], signal=9)
        events = d.result("events.since", seq=0)["events"]
        freeze = next(e for e in events if e["kind"] == "freeze")
        crossings = {e["detail"]["kernel_monotonic_s"]: e for e in events
                     if e["kind"] == "threshold" and e["detail"]["source"] == "ebpf"}
        crossing = crossings.get(freeze["detail"]["observed_monotonic_s"])   # it acted on a kernel event
        assert crossing is not None, events
        assert crossing["call_id"] == freeze["call_id"] == begun["call_id"]
        assert freeze["detail"]["applied_monotonic_s"] > crossing["detail"]["kernel_monotonic_s"]
        assert crossing["detail"]["rss_bytes"] >= crossing["detail"]["threshold_bytes"]
