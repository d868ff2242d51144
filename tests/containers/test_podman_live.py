"""Adopted Podman containers on the real kernel: a real daemon (eBPF on), real containers
(busybox-static image, the host's /usr bind-mounted read-only for python3), real
`podman exec`, `podman stop`. Nothing here is mocked."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from agentcg.controller.daemon.testing import read_line
from containerutil import PODMAN, cgroup_dirs, init_pid, podman
from testutil import wait_until

MiB = 1 << 20
ALLOC = "import sys; x = bytearray({n} << 20); x[::4096] = b'a' * len(x[::4096]); sys.exit({code})"


def _cli(d, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "agentcg.cli", "sandbox", *args, "--socket", str(d.socket_path)],
                          capture_output=True, text=True, timeout=60)


def _proc_cgroup(pid: int) -> str:
    return Path(f"/proc/{pid}/cgroup").read_text()


def _v2_dir(cid: str) -> Path:
    return Path(f"/sys/fs/cgroup/unified/libpod_parent/libpod-{cid}")


def test_adopt_three_execs_become_records_with_kernel_peaks_and_release_restores(containers, adopting_daemon):
    cid = containers()
    pid = init_pid(cid)
    before_cgroup, before_dirs = _proc_cgroup(pid), cgroup_dirs(cid)
    d = adopting_daemon()
    adopted = _cli(d, "adopt", "C", "--container", cid[:12], "--runtime", "podman")
    assert adopted.returncode == 0, adopted.stderr
    assert f"libpod-{cid}" in adopted.stdout
    assert _proc_cgroup(pid).splitlines()[-1] == f"0::/libpod_parent/libpod-{cid}/agent"
    assert f"memory:/libpod_parent/libpod-{cid}/agent" in _proc_cgroup(pid)
    sandbox = d.result("sandbox.get", name="C")
    assert sandbox["memory_budget_bytes"] is None    # the container has no memory limit

    runs = [podman("exec", cid, "sh", "-c", "echo one; sleep 0.2"),
            podman("exec", cid, "python3", "-c", ALLOC.format(n=200, code=3), check=False),
            podman("exec", cid, "ls", "/")]
    assert [r.returncode for r in runs] == [0, 3, 0]
    assert wait_until(lambda: len(d.records()) == 3, 10), d.records()
    by_tool = {r["tool"]: r for r in d.records()}
    assert set(by_tool) == {"sh", "python3", "ls"}
    assert [by_tool[t]["exit_code"] for t in ("sh", "python3", "ls")] == [0, 3, 0]
    big = by_tool["python3"]["peak_memory_bytes"]
    assert 200 * MiB <= big < 260 * MiB, big
    assert by_tool["sh"]["peak_memory_bytes"] < 20 * MiB and by_tool["ls"]["peak_memory_bytes"] < 20 * MiB
    # eBPF RSS needs the opt-in `faults` concern (docs/ebpf.md); by default it is not measured
    assert all(r["peak_rss_bytes"] is None for r in by_tool.values())
    for record in by_tool.values():
        extra = record["extra"]
        assert record["sandbox"] == "C" and extra["container_id"] == cid[:12] and extra["from_exec"] == 1
        assert extra["host_pid"] > 1 and 1 < extra["container_pid"] < extra["host_pid"], extra
    assert d.result("sandbox.get", name="C")["calls"] == []

    released = _cli(d, "release", "C")
    assert released.returncode == 0, released.stderr
    assert _proc_cgroup(pid) == before_cgroup
    assert cgroup_dirs(cid) == before_dirs
    assert podman("exec", cid, "true").returncode == 0     # exec still works, and is no call now
    time.sleep(0.3)
    assert len(d.records()) == 3
    assert d.result("sandbox.list")["sandboxes"] == []


GROW = ("import os, time\n"
        "chunks = []\n"
        "while len(chunks) < {mib}:\n"
        "    chunks.append(bytearray(1 << 20)); chunks[-1][::4096] = b'b' * 256\n"
        "    time.sleep({pause})\n"
        "print('done', flush=True)\n")
HOLD = ("import os, time\n"
        "x = bytearray({mib} << 20); x[::4096] = b'a' * len(x[::4096])\n"
        "print('holding', flush=True)\n"
        "while not os.path.exists('/x/go'): time.sleep(0.02)\n")


def test_a_burst_past_the_budget_freezes_and_thaws_that_call_not_the_container(containers, adopting_daemon, tmp_path):
    shared = tmp_path / "x"
    shared.mkdir()
    cid = containers(extra=("-v", f"{shared}:/x"))
    d = adopting_daemon(policy={"name": "agentcg", "tick_s": 0.1})
    d.result("sandbox.adopt", name="B", pid=init_pid(cid), runtime="podman", container_id=cid,
             memory_budget_bytes=500 * MiB)
    holder = subprocess.Popen([*PODMAN, "exec", cid, "python3", "-c", HOLD.format(mib=200)], stdout=subprocess.PIPE,
                              text=True)
    grower = None
    try:
        assert holder.stdout.readline().strip() == "holding"
        grower = subprocess.Popen([*PODMAN, "exec", cid, "python3", "-c", GROW.format(mib=280, pause=0.05)],
                                  stdout=subprocess.PIPE, text=True)
        tools = _v2_dir(cid) / "tools"

        def frozen_calls() -> list[str]:
            return [p.name for p in tools.iterdir() if p.is_dir()
                    and "frozen 1" in (p / "cgroup.events").read_text()]

        assert wait_until(lambda: frozen_calls(), 30), d.log()
        frozen = frozen_calls()
        running = {c["call_id"]: c for c in d.result("sandbox.get", name="B")["calls"]}
        assert len(frozen) == 1 and running[frozen[0]]["tool"] == "python3"
        assert grower.poll() is None and holder.poll() is None
        # per call: the container, the agent and the other call run on
        for path in (_v2_dir(cid), _v2_dir(cid) / "agent"):
            assert "frozen 0" in (path / "cgroup.events").read_text()
        assert len(running) == 2
        (shared / "go").touch()                 # the holder frees its 200 MiB and exits
        assert holder.wait(30) == 0
        assert grower.stdout.readline().strip() == "done"   # thawed: it finished its growth
        assert grower.wait(30) == 0
    finally:
        (shared / "go").touch()
        for proc in (holder, grower):
            if proc is not None:
                proc.kill()
                proc.wait()
                proc.stdout.close()
    assert wait_until(lambda: len(d.records()) == 2, 10)
    assert all(r["exit_code"] == 0 and r["policy_action"] != "kill" for r in d.records()), d.records()
    grown = next(r for r in d.records() if r["call_id"] == frozen[0])
    assert grown["peak_memory_bytes"] >= 280 * MiB
    metrics = d.metrics_text()
    kinds = {line.split('kind="')[1].split('"')[0] for line in metrics.splitlines()
             if line.startswith("agentcg_actions_total{")}
    assert {"freeze", "thaw"} <= kinds, kinds


def test_podman_stop_with_calls_running_ends_them_and_leaves_no_agentcg_cgroup(containers, adopting_daemon):
    cid = containers()
    d = adopting_daemon()
    d.result("sandbox.adopt", name="S", pid=init_pid(cid), container_id=cid, runtime="podman")
    execs = [subprocess.Popen([*PODMAN, "exec", cid, "sleep", "60"]) for _ in range(2)]
    try:
        assert wait_until(lambda: len(d.result("sandbox.get", name="S")["calls"]) == 2, 15)
        stop = podman("stop", "-t", "2", cid, check=False)
        assert stop.returncode == 0, stop.stderr
        for proc in execs:
            proc.wait(30)
    finally:
        for proc in execs:
            proc.kill()
            proc.wait()
    assert wait_until(lambda: len(d.records()) == 2, 10), d.log()
    # killed with the container's PID namespace (eBPF saw the signal), or ended when it exited
    assert all(r["signal"] in (9, 15) or r["extra"].get("container_exited") == 1 for r in d.records()), d.records()
    assert wait_until(lambda: d.result("sandbox.list")["sandboxes"] == [], 5)
    assert cgroup_dirs(cid) == [], cgroup_dirs(cid)    # the runtime removed its cgroup; nothing of ours left
    assert podman("start", cid).returncode == 0          # and it can start again
    assert podman("exec", cid, "true").returncode == 0


def test_daemon_restart_readopts_and_kills_nothing(containers, adopting_daemon, tmp_path):
    shared = tmp_path / "x"
    shared.mkdir()
    cid = containers(extra=("-v", f"{shared}:/x"))
    pid = init_pid(cid)
    d = adopting_daemon()
    d.result("sandbox.adopt", name="R", pid=pid, container_id=cid, runtime="podman")
    long_call = subprocess.Popen([*PODMAN, "exec", cid, "sh", "-c", "while [ ! -e /x/end ]; do sleep 0.05; done"])
    try:
        assert wait_until(lambda: len(d.result("sandbox.get", name="R")["calls"]) == 1, 15)
        call_id = d.result("sandbox.get", name="R")["calls"][0]["call_id"]
        d.kill9()
        d.start()
        assert "R" in {s["name"] for s in d.result("sandbox.list")["sandboxes"]}
        assert call_id in {c["call_id"] for c in d.result("sandbox.get", name="R")["calls"]}
        assert long_call.poll() is None and Path(f"/proc/{pid}").exists()
        assert podman("exec", cid, "ls", "/").returncode == 0          # still caught after the restart
        (shared / "end").touch()
        assert long_call.wait(30) == 0                                 # it ran to its end
    finally:
        long_call.kill()
        long_call.wait()
    assert wait_until(lambda: sorted(r["tool"] for r in d.records()) == ["ls", "sh"], 15), d.records()
    assert d.request("sandbox.adopt", name="R2", pid=pid)["error"]["code"] == "exists"
    assert d.result("sandbox.release", name="R")["released"] == "R"
    assert _proc_cgroup(pid).splitlines()[-1] == f"0::/libpod_parent/libpod-{cid}"


def test_bad_input_and_faults_are_refused_with_clear_errors(containers, adopting_daemon):
    cid = containers()
    exited = containers("true")
    assert wait_until(lambda: podman("inspect", "--format", "{{.State.Running}}", exited).stdout.strip() == "false", 15)
    d = adopting_daemon()
    missing = _cli(d, "adopt", "X", "--container", "nosuchcontainer", "--runtime", "podman")
    assert missing.returncode == 1 and "no container 'nosuchcontainer'" in missing.stderr
    stopped = _cli(d, "adopt", "X", "--container", exited, "--runtime", "podman")
    assert stopped.returncode == 1 and "not running" in stopped.stderr, stopped.stderr
    assert _cli(d, "adopt", "X", "--pid", "1", "--cgroup", "x").returncode == 2
    assert d.request("sandbox.adopt", name="X", container="nosuchcontainer", runtime="podman")["error"]["code"] \
        == "not_found"
    for bad, code in (("../../etc", "invalid_input"), (f"/{d.root}", "invalid_input"),
                      ("libpod_parent/../libpod_parent", "invalid_input"), ("no/such/cgroup", "not_found")):
        response = d.request("sandbox.adopt", name="X", cgroup=bad)
        assert response["error"]["code"] == code, (bad, response)
    pid = init_pid(cid)
    d.result("sandbox.adopt", name="A", cgroup=f"/libpod_parent/libpod-{cid}")
    assert d.request("sandbox.adopt", name="A", pid=pid)["error"]["code"] == "exists"
    twice = d.request("sandbox.adopt", name="B", pid=pid)
    assert twice["error"]["code"] == "exists" and "as sandbox 'A'" in twice["error"]["message"]
    assert d.request("sandbox.remove", name="A")["error"]["code"] == "invalid_input"
    assert d.request("sandbox.release", name="nope")["error"]["code"] == "not_found"
    assert d.result("sandbox.release", name="A")["released"] == "A"
    assert _proc_cgroup(pid).splitlines()[-1] == f"0::/libpod_parent/libpod-{cid}"


AGENT = ("while [ ! -e /x/stop ]; do\n"
         "  if [ -e /x/go ]; then rm -f /x/go; python3 -c \"x = bytearray(64 << 20); x[::4096] = b'a' * 16384\"; "
         "python3 -c 'print(1)' > /dev/null; touch /x/done; fi\n"
         "  sleep 0.05\n"
         "done\n")


def test_commands_the_containers_agent_starts_are_tool_calls_too(containers, adopting_daemon, tmp_path):
    shared = tmp_path / "x"
    shared.mkdir()
    cid = containers("sh", "-c", AGENT, extra=("-v", f"{shared}:/x"))
    d = adopting_daemon()
    adopted = _cli(d, "adopt", "G", "--container", cid, "--tools", "python3*")
    assert adopted.returncode == 0, adopted.stderr
    (shared / "go").touch()
    assert wait_until(lambda: (shared / "done").exists(), 20)
    assert wait_until(lambda: len(d.records()) == 2, 10), d.records()
    first, second = sorted(d.records(), key=lambda r: r["start_monotonic_s"])
    assert (first["tool"], second["tool"]) == ("python3", "python3")
    assert 64 * MiB <= first["peak_memory_bytes"] < 100 * MiB and second["peak_memory_bytes"] < 40 * MiB
    assert first["extra"]["from_exec"] == 0 and first["exit_code"] == 0
    # the agent's sleeps do not match --tools: no records; pause and unpause still work
    assert podman("pause", cid).returncode == 0 and podman("unpause", cid).returncode == 0
    assert len(d.records()) == 2
    (shared / "stop").touch()


def test_adopt_by_container_inspects_off_the_loop_and_checks_the_claimed_id(containers, adopting_daemon, tmp_path,
                                                                           monkeypatch):
    """`sandbox.adopt {"container"}`: the daemon's `podman inspect` is held (a podman on
    the daemon's PATH that waits for a file), and meanwhile the daemon answers others, a
    fifth inspect is refused as busy, and the adoption is answered once inspect is done.
    A pid whose cgroup is another container's than the id claimed is refused."""
    cid, other = containers(), containers()
    bin_dir, go, started = tmp_path / "bin", tmp_path / "go", tmp_path / "started"
    bin_dir.mkdir()
    real = subprocess.run(["sh", "-c", "command -v podman"], capture_output=True, text=True).stdout.strip()
    (bin_dir / "podman").write_text(f"#!/bin/sh\necho $$ >> {started}\nwhile [ ! -e {go} ]; do sleep 0.05; done\n"
                                    f"exec {real} \"$@\"\n")
    (bin_dir / "podman").chmod(0o755)
    with monkeypatch.context() as m:     # only the daemon's podman is held; the test's own is the real one
        m.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
        d = adopting_daemon()
    waiting = []
    try:
        for i in range(4):
            sock = d.connect()
            waiting.append(sock)
            sock.sendall(json.dumps({"v": 1, "id": i, "op": "sandbox.adopt",
                                     "args": {"name": f"I{i}", "container": cid[:12], "runtime": "podman"}}).encode()
                         + b"\n")
        assert wait_until(lambda: started.exists() and len(started.read_text().split()) == 4, 15)
        assert d.result("sandbox.list")["sandboxes"] == []
        held = [int(p) for p in started.read_text().split()]
        assert all(Path(f"/proc/{p}").exists() for p in held)        # answered while all four inspects wait
        busy = d.request("sandbox.adopt", name="I9", container=cid, runtime="podman")
        assert busy["error"]["code"] == "busy", busy
        go.touch()
        answers = [json.loads(read_line(sock)) for sock in waiting]
    finally:
        go.touch()
        for sock in waiting:
            sock.close()
    adopted = [a for a in answers if a["ok"]]
    assert len(adopted) == 1, answers
    assert adopted[0]["result"]["adopted"]["container_id"] == cid
    assert adopted[0]["result"]["adopted"]["runtime"] == "podman"
    assert all(a["error"]["code"] == "exists" for a in answers if not a["ok"]), answers
    assert _proc_cgroup(init_pid(cid)).splitlines()[-1] == f"0::/libpod_parent/libpod-{cid}/agent"

    wrong = d.request("sandbox.adopt", name="W", pid=init_pid(other), container_id=cid, runtime="podman")
    assert wrong["error"]["code"] == "invalid_input" and f"not in {cid[:12]}'s" in wrong["error"]["message"], wrong
    assert d.result("sandbox.list")["sandboxes"][0]["name"] == adopted[0]["result"]["name"]
    assert _proc_cgroup(init_pid(other)).splitlines()[-1] == f"0::/libpod_parent/libpod-{other}"
