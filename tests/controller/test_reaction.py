"""Per-call kernel memcg usage thresholds (cgroup v1 `cgroup.event_control` + eventfd on
the call's own memory cgroup): armed from the policy's fractions, fired on the real
kernel, re-armed when the wanted threshold moves, closed when the call ends (no eventfd
outlives its call: in the Reactor and in a live daemon)."""
from __future__ import annotations

import os
import select
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest

from agentcg.client import spawn_into
from agentcg.controller.cgroup import open_tree
from agentcg.controller.core import Thresholds
from agentcg.controller.daemon.metrics import DaemonStats
from agentcg.controller.daemon.reaction import Reactor
from agentcg.controller.daemon.testing import daemon_process
from agentcg.errors import AgentcgError
from testutil import wait_until

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="memcg thresholds need cgroups we create: run as root")

MiB = 1 << 20


def _eventfds(pid: int | str = "self") -> int:
    fds = f"/proc/{pid}/fd"
    count = 0
    for name in os.listdir(fds):
        try:
            count += os.readlink(f"{fds}/{name}") == "anon_inode:[eventfd]"
        except OSError:
            pass
    return count


def _non_socket_fds(pid: int) -> list[str]:
    out = []
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{name}")
        except OSError:
            continue
        if not target.startswith("socket:"):
            out.append(target)
    return sorted(out)


def _steady_fds(pid: int) -> int:
    """The fewest non-socket fds over a few samples (the daemon opens cgroup files for a
    moment on every step; client connections come and go): a leak stays in every sample."""
    counts = []
    for _ in range(20):
        counts.append(len(_non_socket_fds(pid)))
        time.sleep(0.01)
    return min(counts)


class _Epoll:
    def __init__(self) -> None:
        self.ep, self.handlers = select.epoll(), {}

    def register(self, fd, mask, handler):
        self.ep.register(fd, mask)
        self.handlers[fd] = handler

    def unregister(self, fd):
        self.ep.unregister(fd)
        del self.handlers[fd]

    def dispatch(self, timeout_s: float) -> int:
        ready = self.ep.poll(timeout_s)
        for fd, mask in ready:
            self.handlers[fd](fd, mask)
        return len(ready)


def _reactor(tree, crossings):
    ep = _Epoll()
    reactor = Reactor(tree, None, Thresholds((0.5, 0.8)), DaemonStats(), ep.register, ep.unregister,
                      lambda cgroup_id: None, crossings.extend, lambda *a: None)
    if not reactor.memcg_available:
        pytest.skip("no cgroup v1 memory hierarchy here (pure v2): memcg thresholds do not exist")
    return reactor, ep


def test_a_call_threshold_fires_for_that_call_is_rearmed_and_closes_with_it(cgroup_tree):
    crossings: list = []
    reactor, ep = _reactor(cgroup_tree, crossings)
    assert reactor.mode == "memcg-eventfd"
    cgroup_tree.create("sb")
    cgroup_tree.create("sb/c1")
    call = SimpleNamespace(call_id="c1", sandbox="sb", path="sb/c1", cgroup_id=cgroup_tree.cgroup_id("sb/c1"))
    before = _eventfds()
    reactor.arm_calls({"c1": 32 * MiB}, [call])
    assert reactor.armed() == {"c1": 32 * MiB} and _eventfds() == before + 1
    proc = cgroup_tree.spawn("sb/c1", [sys.executable, "-S", "-c",
                                       "import sys; b = bytearray(48 << 20); print('ok', flush=True); sys.stdin.read()"],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert proc.stdout.readline().strip() == b"ok"
        assert wait_until(lambda: ep.dispatch(0.1) or crossings, 10), "the call's threshold never fired"
        sandbox, call_id, read_s, detail = crossings[0]
        assert (sandbox, call_id) == ("sb", "c1") and detail["source"] == "memcg" and detail["scope"] == "call"
        assert detail["usage_bytes"] >= detail["threshold_bytes"] == 32 * MiB and read_s > 0
        # re-armed above: a new eventfd first, the old one closed; a move under 1/32 writes nothing
        reactor.arm_calls({"c1": 96 * MiB}, [call])
        assert reactor.armed() == {"c1": 96 * MiB} and _eventfds() == before + 1
        reactor.arm_calls({"c1": 96 * MiB + (64 << 10)}, [call])
        assert reactor.armed() == {"c1": 96 * MiB}
        crossings.clear()
        ep.dispatch(0.2)
        assert crossings == []                   # 48 MiB is below the new threshold: nothing fires
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()
        proc.stdin.close()
    # the cgroup goes while its threshold is armed: the kernel signals the eventfd, which is no crossing
    cgroup_tree.remove("sb/c1")
    ep.dispatch(0.5)
    assert crossings == []
    reactor.call_ended("c1")
    assert reactor.armed() == {} and _eventfds() == before and not ep.handlers
    # not running any more / nothing wanted: nothing armed
    reactor.arm_calls({"c1": 32 * MiB}, [])
    assert reactor.armed() == {}
    reactor.close()


def test_calls_not_wanted_lose_their_threshold_and_close_drops_all(cgroup_tree):
    reactor, ep = _reactor(cgroup_tree, [])
    cgroup_tree.create("sb")
    calls = []
    for i in range(4):
        cgroup_tree.create(f"sb/c{i}")
        calls.append(SimpleNamespace(call_id=f"c{i}", sandbox="sb", path=f"sb/c{i}",
                                     cgroup_id=cgroup_tree.cgroup_id(f"sb/c{i}")))
    before = _eventfds()
    reactor.arm_calls({c.call_id: 64 * MiB for c in calls}, calls)
    assert _eventfds() == before + 4
    reactor.arm_calls({"c0": 64 * MiB, "c1": None}, calls)   # None: past the last fraction
    assert set(reactor.armed()) == {"c0"} and _eventfds() == before + 1
    reactor.close()
    assert _eventfds() == before and not ep.handlers


def test_a_missing_cgroup_is_not_armed_and_not_an_error(cgroup_tree):
    reactor, _ = _reactor(cgroup_tree, [])
    ghost = SimpleNamespace(call_id="gone", sandbox="sb", path="sb/gone", cgroup_id=1)
    reactor.arm_calls({"gone": 64 * MiB}, [ghost])
    assert reactor.armed() == {}


def test_the_daemon_arms_one_threshold_per_call_and_leaks_none():
    """Default configuration (no eBPF per-fault programs): each running call holds one
    memcg threshold eventfd in the daemon; 30 calls begun and ended leave the daemon with
    exactly the eventfds it had before (the sandbox's three, one per fraction)."""
    with daemon_process(policy={"name": "agentcg", "tick_s": 0.1}, psi={"enabled": False}) as d:
        try:
            open_tree(root=d.root).cgroup_dir("", "memory")
        except AgentcgError:
            pytest.skip("no cgroup v1 memory hierarchy here (pure v2): memcg thresholds do not exist")
        assert d.result("state")["reaction"].startswith("memcg-eventfd")
        d.result("sandbox.create", name="A", memory_budget_bytes=256 * MiB)
        pid = d.proc.pid
        assert wait_until(lambda: _eventfds(pid) == 3, 10), _eventfds(pid)      # 80 %, 90 %, 97 %
        fds = _steady_fds(pid)
        for _ in range(6):
            begun = [d.result("toolcall.begin", sandbox="A", tool="t") for _ in range(5)]
            assert _eventfds(pid) == 3 + 5          # armed at admission, before the call can allocate
            for b in begun:
                d.result("toolcall.end", call_id=b["call_id"], exit_code=0)
            assert _eventfds(pid) == 3              # closed with the call, not at the next step
        assert _steady_fds(pid) <= fds              # no fd of any kind more than before


def test_the_default_configuration_freezes_a_call_on_a_memcg_crossing_without_ebpf():
    """No eBPF at all, tick 5 s, PSI off: only a memcg eventfd (the call's own or its
    sandbox's) can make the daemon act within the allocation; the freeze is timed from
    the daemon's read of that eventfd."""
    policy = {"name": "agentcg", "tick_s": 5.0, "throttle_at": 0.8, "freeze_at": 0.8, "kill_at": 0.99,
              "relax_below": 0.5, "lookahead_s": 0}
    with daemon_process(policy=policy, psi={"enabled": False}) as d:
        try:
            open_tree(root=d.root).cgroup_dir("", "memory")
        except AgentcgError:
            pytest.skip("no cgroup v1 memory hierarchy here (pure v2): memcg thresholds do not exist")
        assert d.result("state")["reaction"] == "memcg-eventfd"
        d.result("sandbox.create", name="A", memory_budget_bytes=256 * MiB)
        begun = d.result("toolcall.begin", sandbox="A", tool="alloc")
        proc = spawn_into(begun["cgroup_procs"], [sys.executable, "-S", "-c",
                                                  "import sys; b = bytearray(230 << 20); sys.stdin.read()"],
                          stdin=subprocess.PIPE)
        try:
            assert wait_until(lambda: any(e["kind"] == "freeze" for e in d.result("events.since", seq=0)["events"]),
                              4), d.result("events.since", seq=0)
        finally:
            proc.kill()
            proc.wait()
            proc.stdin.close()
            d.request("toolcall.end", call_id=begun["call_id"], signal=9)
        events = d.result("events.since", seq=0)["events"]
        freeze = next(e for e in events if e["kind"] == "freeze")
        crossings = {e["detail"]["read_monotonic_s"]: e for e in events
                     if e["kind"] == "threshold" and e["detail"]["source"] == "memcg"}
        crossing = crossings.get(freeze["detail"]["observed_monotonic_s"])    # it acted on an eventfd
        assert crossing is not None, events
        assert crossing["detail"]["scope"] in ("call", "sandbox") and freeze["call_id"] == begun["call_id"]
        assert crossing["detail"]["usage_bytes"] >= crossing["detail"]["threshold_bytes"]
        assert freeze["detail"]["applied_monotonic_s"] > crossing["detail"]["read_monotonic_s"]
        assert 'agentcg_memcg_thresholds_total{scope="' in d.metrics_text()


def test_pure_v2_watches_memory_events_instead(fixture_v2_tree):
    """Pure cgroup v2 (a copied cgroup2 fixture: this host's v2 has no memory controller,
    and a regular file cannot be in an epoll, so the kernfs notification is simulated by
    calling the registered handler after the file changed): no usage thresholds exist, so
    the daemon watches each budgeted sandbox's memory.events, and a counter that grows is a
    crossing."""
    registered: dict = {}
    crossings: list = []
    reactor = Reactor(fixture_v2_tree, None, Thresholds((0.8,)), DaemonStats(),
                      lambda fd, mask, handler: registered.__setitem__(fd, (mask, handler)),
                      lambda fd: registered.pop(fd), lambda cgroup_id: None, crossings.extend, lambda *a: None)
    assert not reactor.memcg_available and reactor.mode == "memory-events+psi-and-tick"
    reactor.arm_scopes({"sb1": 256 * MiB})
    assert len(registered) == 1
    (mask, handler), = registered.values()
    assert mask & select.EPOLLPRI
    handler(0, mask)
    assert crossings == []                               # nothing changed since it was armed
    events = fixture_v2_tree.cgroup_dir("sb1") / "memory.events"
    events.write_text(events.read_text().replace("high 412", "high 415"))
    handler(0, mask)
    (sandbox, call_id, _, detail), = crossings
    assert (sandbox, call_id, detail["source"], detail["events"]) == ("sb1", None, "memory.events", {"high": 3})
    reactor.forget_scope("sb1")
    assert registered == {}
    off = Reactor(fixture_v2_tree, None, Thresholds((0.8,)), DaemonStats(), lambda *a: None, lambda fd: None,
                  lambda cgroup_id: None, crossings.extend, lambda *a: None, enabled=False)
    assert off.mode == "psi-and-tick"


_GROWER = ("import sys\nkeep = []\nprint('ready', flush=True)\n"
           "for line in sys.stdin:\n    keep.append(b'\\x01' * int(line))\n    print('ok', flush=True)\n")


def _grower_call(tree):
    """Call c1 of sandbox sb with _GROWER running in it: (call, its memory.usage_in_bytes, process)."""
    tree.create("sb")
    tree.create("sb/c1")
    call = SimpleNamespace(call_id="c1", sandbox="sb", path="sb/c1", cgroup_id=tree.cgroup_id("sb/c1"))
    usage_file = tree.cgroup_dir("sb/c1", "memory") / "memory.usage_in_bytes"
    proc = tree.spawn("sb/c1", [sys.executable, "-S", "-c", _GROWER], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    return call, usage_file, proc

def test_a_call_armed_early_is_watched_over_the_last_stretch_then_armed_exactly(cgroup_tree):
    """The call's eventfd is armed EARLY_BYTES below its threshold (the kernel checks v1
    thresholds only every 128 page events): a call that stops in between is watched, not
    reported; when the watch runs out its eventfd moves to the threshold itself, and the
    crossing is reported when the call goes on."""
    from agentcg.controller.daemon.reaction import EARLY_BYTES, WATCH_MAX_S
    crossings: list = []
    reactor, ep = _reactor(cgroup_tree, crossings)
    call, usage_file, proc = _grower_call(cgroup_tree)
    try:
        assert proc.stdout.readline().strip() == b"ready"
        threshold = int(usage_file.read_text()) + 16 * MiB
        before = _eventfds()
        reactor.arm_calls({"c1": threshold}, [call])
        assert reactor.armed() == {"c1": threshold} and _eventfds() == before + 1
        # into the stretch between the early mark and the threshold
        proc.stdin.write(b"%d\n" % (threshold - EARLY_BYTES // 2 - int(usage_file.read_text())))
        proc.stdin.flush()
        assert proc.stdout.readline().strip() == b"ok"
        assert threshold - EARLY_BYTES < int(usage_file.read_text()) < threshold
        assert wait_until(lambda: ep.dispatch(0.01) >= 0 and reactor.watching() == {"c1"}, 5), \
            "the early eventfd never fired"
        assert wait_until(lambda: ep.dispatch(0.01) >= 0 and not reactor.watching(), 10 * WATCH_MAX_S + 5)
        assert crossings == [] and len(ep.handlers) == 1      # the watch's timer closed with it
        # the eventfd is at the threshold now: going on reports the crossing
        proc.stdin.write(b"%d\n" % (2 * MiB))
        proc.stdin.flush()
        assert proc.stdout.readline().strip() == b"ok"
        assert wait_until(lambda: ep.dispatch(0.1) >= 0 and crossings, 10), "the exact eventfd never fired"
        sandbox, call_id, _, detail = crossings[0]
        assert (sandbox, call_id) == ("sb", "c1") and detail["usage_bytes"] >= detail["threshold_bytes"] == threshold
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()
        proc.stdin.close()
    reactor.close()
    assert _eventfds() == before and not ep.handlers


def test_the_watch_reports_the_crossing_itself(cgroup_tree, monkeypatch):
    from agentcg.controller.daemon import reaction
    from agentcg.controller.daemon.reaction import EARLY_BYTES
    monkeypatch.setattr(reaction, "WATCH_MAX_S", 10.0)     # a loaded test host must not outlast the watch
    crossings: list = []
    reactor, ep = _reactor(cgroup_tree, crossings)
    call, usage_file, proc = _grower_call(cgroup_tree)
    try:
        assert proc.stdout.readline().strip() == b"ready"
        threshold = int(usage_file.read_text()) + 16 * MiB
        reactor.arm_calls({"c1": threshold}, [call])
        proc.stdin.write(b"%d\n" % (threshold - EARLY_BYTES // 2 - int(usage_file.read_text())))
        proc.stdin.flush()
        assert proc.stdout.readline().strip() == b"ok"
        assert wait_until(lambda: ep.dispatch(0.01) >= 0 and reactor.watching() == {"c1"}, 5)
        proc.stdin.write(b"%d\n" % MiB)        # across, while watched: no kernel check needed
        proc.stdin.flush()
        assert proc.stdout.readline().strip() == b"ok"
        assert wait_until(lambda: ep.dispatch(0.01) >= 0 and crossings, 5), "the watch missed the crossing"
        _, call_id, read_s, detail = crossings[0]
        assert call_id == "c1" and detail["watched"] and detail["usage_bytes"] >= detail["threshold_bytes"] == threshold
        assert not reactor.watching()
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()
        proc.stdin.close()
    reactor.close()
    assert not ep.handlers
