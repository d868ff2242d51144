"""The daemon on the real kernel: a subprocess on a temporary socket, state directory and
cgroup root (agentcg-test-*), talked to over its socket; always stopped and removed."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time

import pytest

from agentcg.controller.daemon.config import DaemonConfig, load_config, parse_config
from agentcg.controller.daemon.testing import daemon_process, read_line
from agentcg.errors import InvalidInput
from testutil import wait_until

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the daemon creates cgroups: run the tests as root")




def _spawn_into(procs_files, argv, **kw):
    from agentcg.client import spawn_into
    return spawn_into(procs_files, argv, **kw)


# ---- configuration -------------------------------------------------------------------
def test_config_defaults_need_no_file():
    config = load_config(None)
    assert config.daemon.socket_mode == 0o660 and config.daemon.cgroup_root == "agentcg"
    assert config.metrics.address.startswith("127.0.0.1:")
    assert config.psi.window_s == 2.0 and config.ebpf.mode == "auto"
    assert config.policy.name == "agentcg" and config.daemon.realtime_priority == 0
    assert config == DaemonConfig()        # the parsers' defaults are the sections' own, written once


@pytest.mark.parametrize("data, words", [
    ({"deamon": {}}, "unknown section"),
    ({"daemon": {"sockt_path": "/x"}}, "unknown key"),
    ({"daemon": {"socket_mode": "0999"}}, "octal"),
    ({"daemon": {"socket_mode": "0440"}}, "owner read/write"),
    ({"daemon": {"socket_group": "no-such-group-acg"}}, "does not exist"),
    ({"daemon": {"cgroup_root": "../etc"}}, "cgroup_root"),
    ({"limits": {"grace_s": "soon"}}, "duration"),
    ({"limits": {"call_pids_max": 0}}, "1..4194304"),
    ({"limits": {"max_sandboxes": True}}, "integer"),
    ({"metrics": {"address": "localhost"}}, "host:port"),
    ({"ebpf": {"mode": "maybe"}}, "auto"),
    ({"psi": {"window_s": 20}}, "0.5..10"),
    ({"daemon": {"realtime_priority": 100}}, "0..99"),
])
def test_config_errors_name_the_problem(data, words):
    with pytest.raises(InvalidInput, match=words):
        parse_config(data)


def test_realtime_priority_makes_the_daemon_sched_fifo():
    with daemon_process(daemon={"realtime_priority": 1}) as d:
        assert os.sched_getscheduler(d.proc.pid) == os.SCHED_FIFO
        assert os.sched_getparam(d.proc.pid).sched_priority == 1
    with daemon_process() as d:
        assert os.sched_getscheduler(d.proc.pid) == os.SCHED_OTHER


def test_config_file_and_cli(tmp_path):
    path = tmp_path / "a.toml"
    path.write_text('[limits]\ngrace_s = "250ms"\n[metrics]\naddress = ""\n')
    config = load_config(path)
    assert config.limits.grace_s == 0.25 and config.metrics.address == ""
    path.write_text("[limits\n")
    out = subprocess.run([sys.executable, "-m", "agentcg.cli", "daemon", "--config", str(path), "--print-config"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "not valid TOML" in out.stderr


# ---- bad input -------------------------------------------------------------------------
def _raw(d, payload: bytes) -> dict:
    with d.connect() as sock:
        sock.sendall(payload)
        return json.loads(read_line(sock))


def test_bad_requests_get_clear_errors():
    with daemon_process(protocol={"line_timeout_s": 1.0, "max_connections": 8}) as d:
        cases = [
            (b"not json\n", "invalid_input", "not valid JSON"),
            (b"[1, 2]\n", "invalid_input", "JSON object"),
            (b'{"v": 2, "id": 1, "op": "ping"}\n', "invalid_input", "'v' must be 1"),
            (b'{"v": 1, "id": "x", "op": "ping"}\n', "invalid_input", "'id' must be an integer"),
            (b'{"v": 1, "id": 1, "op": "sandbox.explode"}\n', "invalid_input", "unknown op"),
            (b'{"v": 1, "id": 1, "op": "ping", "args": [1]}\n', "invalid_input", "'args' must be"),
            (b'{"v": 1, "id": 1, "op": "ping", "extra": 1}\n', "invalid_input", "unknown request field"),
        ]
        for payload, code, words in cases:
            response = _raw(d, payload)
            assert not response["ok"] and response["error"]["code"] == code, (payload, response)
            assert words in response["error"]["message"], (payload, response)
        refusals = [
            (("sandbox.create", {"name": "../x"}), "invalid_input", "contains '/'"),
            (("sandbox.create", {"name": ".."}), "invalid_input", "bad sandbox name"),
            (("sandbox.create", {"name": "A", "priority": "urgent"}), "invalid_input", "priority"),
            (("sandbox.create", {"name": "A", "memory_budget_bytes": -5}), "invalid_input", "memory_budget_bytes"),
            (("sandbox.create", {"name": "A", "colour": "red"}), "invalid_input", "unknown argument"),
            (("sandbox.get", {"name": "nope"}), "not_found", "no sandbox 'nope'"),
            (("sandbox.remove", {"name": "nope"}), "not_found", "no sandbox"),
            (("toolcall.end", {"call_id": "tc-000000000000"}), "not_found", "no running tool call"),
            (("toolcall.end", {"call_id": "tc-1", "exit_code": 300}), "invalid_input", "0..255"),
            (("toolcall.begin", {"sandbox": "A", "tool": "x", "command": {"a": 1}}), "invalid_input", "command"),
            (("toolcall.attach", {"call_id": "tc-1"}), "invalid_input", "missing argument 'pid'"),
            (("policy.set", {"name": "oomd"}), "invalid_input", "unknown policy"),
        ]
        for (op, args), code, words in refusals:
            response = d.request(op, **args)
            assert not response["ok"] and response["error"]["code"] == code, (op, args, response)
            assert words in response["error"]["message"], (op, args, response)
        d.result("sandbox.create", name="A")
        response = d.request("sandbox.create", name="A")
        assert response["error"]["code"] == "exists"

        # pipelined requests are answered in order on one connection
        with d.connect() as sock:
            sock.sendall(b"".join(json.dumps({"v": 1, "id": i, "op": "ping"}).encode() + b"\n" for i in range(20)))
            file = sock.makefile("rb")
            assert [json.loads(file.readline())["id"] for _ in range(20)] == list(range(20))

        # oversized: answered too_large, then closed
        with d.connect() as sock:
            sock.sendall(b'{"v": 1, "id": 1, "op": "ping", "args": {"x": "' + b"a" * (70 * 1024))
            response = json.loads(read_line(sock))
            assert response["error"]["code"] == "too_large" and "65536" in response["error"]["message"]
            assert sock.recv(10) == b""

        # a client that starts a line and stalls is timed out and closed; others are served meanwhile
        with d.connect() as stalled:
            stalled.sendall(b'{"v": 1, "id": 9, "op": "pi')
            assert d.result("ping")["daemon_pid"] == d.proc.pid
            started = time.monotonic()
            response = json.loads(read_line(stalled))
            assert response["error"]["code"] == "timeout" and time.monotonic() - started < 5
            assert stalled.recv(10) == b""

        # connections beyond max_connections are told busy
        held = [d.connect() for _ in range(8)]
        try:
            with d.connect() as extra:
                response = json.loads(read_line(extra))
                assert response["error"]["code"] == "busy"
        finally:
            for sock in held:
                sock.close()
        assert wait_until(lambda: d.request("ping")["ok"])


# ---- peer credentials ---------------------------------------------------------------------
# Runs as uid 65534 under the system python (the venv's interpreter lives below /root):
# so it speaks the protocol itself, and joins the call's cgroup the way agentcg.client does.
NONROOT_SCRIPT = textwrap.dedent("""
    import json, os, socket, subprocess, sys
    socket_path, call_b = sys.argv[1], sys.argv[2]
    sock = socket.socket(socket.AF_UNIX)
    sock.connect(socket_path)
    reader = sock.makefile("rb")
    def request(op, **args):
        sock.sendall(json.dumps({"v": 1, "id": 1, "op": op, "args": args}).encode() + b"\\n")
        return json.loads(reader.readline())
    def outcome(response):
        return "allowed" if response["ok"] else response["error"]["code"] + ": " + response["error"]["message"]
    out = {"uid": os.getuid(), "ping": request("ping")["result"]["version"]}
    out["create"] = outcome(request("sandbox.create", name="C"))
    out["end_b"] = outcome(request("toolcall.end", call_id=call_b))
    out["get_b"] = outcome(request("sandbox.get", name="B"))
    out["begin_b"] = outcome(request("toolcall.begin", sandbox="B", tool="x", command="true"))
    out["state"] = outcome(request("state"))
    out["policy"] = outcome(request("policy.set", name="none"))
    out["list"] = [s["name"] for s in request("sandbox.list")["result"]["sandboxes"]]
    begun = request("toolcall.begin", sandbox="A", tool="own", command=["sh", "-c", "exit 3"])["result"]
    fds = [os.open(path, os.O_WRONLY) for path in begun["cgroup_procs"]]
    def join():
        for fd in fds:
            os.write(fd, b"0")
    code = subprocess.run(["sh", "-c", "exit 3"], preexec_fn=join).returncode
    record = request("toolcall.end", call_id=begun["call_id"], exit_code=code)["result"]["record"]
    out["own_call"] = [code, record["sandbox"], record["exit_code"]]
    print(json.dumps(out))
""")


def test_sandbox_process_cannot_end_another_sandboxes_call():
    from agentcg.controller.cgroup import open_tree

    with daemon_process(daemon={"socket_group": "nogroup"}) as d:
        d.result("sandbox.create", name="A")
        d.result("sandbox.create", name="B")
        begun = d.result("toolcall.begin", sandbox="B", tool="sleep", command=["sleep", "30"])
        victim = _spawn_into(begun["cgroup_procs"], ["sleep", "30"])
        try:
            def demote() -> None:
                os.setgroups([])
                os.setgid(65534)
                os.setuid(65534)

            tree = open_tree(root=d.root)
            agent = tree.spawn("A/agent", ["/usr/bin/python3", "-c", NONROOT_SCRIPT, str(d.socket_path),
                                           begun["call_id"]], preexec_fn=demote, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, cwd="/")
            stdout, stderr = agent.communicate(timeout=60)
            assert agent.returncode == 0, stderr.decode()
            out = json.loads(stdout)
            assert out["uid"] == 65534 and out["ping"] == 1
            for name in ("create", "end_b", "get_b", "begin_b", "state", "policy"):
                assert out[name].startswith("forbidden: "), (name, out[name])
            assert "only on its own sandbox" in out["end_b"] and "'A'" in out["end_b"]
            assert "root only" in out["create"]
            assert out["list"] == ["A"]
            assert out["own_call"] == [3, "A", 3]
            # B's call is untouched: still running, its process alive
            running = {c["call_id"] for c in d.result("state")["running_calls"]}
            assert begun["call_id"] in running and victim.poll() is None
        finally:
            victim.kill()
            victim.wait()
        record = d.result("toolcall.end", call_id=begun["call_id"], signal=9)["record"]
        assert record["outcome"] == "signaled" and record["sandbox"] == "B"


# ---- faults ------------------------------------------------------------------------------
FORK_BOMB = textwrap.dedent("""
    import os, time
    n = 0
    for _ in range(10000):
        try:
            pid = os.fork()
        except OSError:
            break
        if pid == 0:
            time.sleep(60)
            os._exit(0)
        n += 1
    print(n, flush=True)
    time.sleep(60)
""")


def test_fork_bomb_stops_at_the_calls_pids_limit():
    with daemon_process(limits={"call_pids_max": 48, "grace_s": 0.3}) as d:
        d.result("sandbox.create", name="A")
        begun = d.result("toolcall.begin", sandbox="A", tool="forkbomb", command="python -c ...")
        assert begun["limits"]["pids_max"] == 48
        proc = _spawn_into(begun["cgroup_procs"], [sys.executable, "-c", FORK_BOMB], stdout=subprocess.PIPE)
        try:
            forked = int(proc.stdout.readline())
            assert 0 < forked < 48
            call = d.result("sandbox.get", name="A")["calls"]
            assert [c["call_id"] for c in call] == [begun["call_id"]]
            assert d.result("ping")["version"] == 1      # the daemon keeps serving
        finally:
            proc.kill()
            proc.wait()
            proc.stdout.close()
        record = d.result("toolcall.end", call_id=begun["call_id"], signal=9)["record"]
        # the forked children outlived the main process: killed after the grace period
        assert record["policy_action"] == "grace_kill" and record["tool"] == "forkbomb"
        assert not d.result("sandbox.get", name="A")["calls"]
        metrics = d.metrics_text()
        assert 'agentcg_actions_total{kind="kill",reason="grace_expired"} 1.0' in metrics


def test_kill9_and_restart_keeps_every_running_call(tmp_path):
    """50 running calls survive a kill -9 of the daemon, are adopted and later recorded;
    plus a call whose owner died (reaped with a record), a cgroup the state file does not
    know (adopted as "unknown"), and a call whose cgroup vanished meanwhile ("lost").
    The calls run until the test releases them (a flag file), so a loaded host cannot let
    them end before the restart."""
    release = tmp_path / "release"
    wait_for_release = ["sh", "-c", f'while [ ! -e "{release}" ]; do sleep 0.05; done']
    with daemon_process() as d:
        d.result("sandbox.create", name="S", memory_budget_bytes=1 << 30)
        calls, procs = [], []
        try:
            for i in range(50):
                begun = d.result("toolcall.begin", sandbox="S", tool=f"t{i % 3}", command=wait_for_release)
                calls.append(begun["call_id"])
                procs.append(_spawn_into(begun["cgroup_procs"], wait_for_release))
            last_begun_s = time.monotonic()
            owner = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
                import json, socket, sys
                s = socket.socket(socket.AF_UNIX); s.connect({str(d.socket_path)!r})
                s.sendall(b'{{"v": 1, "id": 1, "op": "toolcall.begin", "args": {{"sandbox": "S", "tool": "orphan"}}}}\\n')
                print(json.loads(s.makefile().readline())["result"]["call_id"], flush=True)
                sys.stdin.read()
            """)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            orphan = owner.stdout.readline().strip()
            lost = d.result("toolcall.begin", sandbox="S", tool="lost")["call_id"]
            d.kill9()
            owner.kill()      # the orphan's owner dies while no daemon runs
            owner.wait()
            owner.stdin.close()
            owner.stdout.close()

            from agentcg.controller.cgroup import open_tree
            tree = open_tree(root=d.root)
            assert all(tree.exists(f"S/tools/{c}") for c in calls)
            tree.remove(f"S/tools/{lost}")
            tree.create("S/tools/stray-1")
            assert all(p.poll() is None for p in procs)   # the calls' processes never noticed

            d.start()
            state = d.result("state")
            assert state["adoption"] == {"sandboxes": 1, "recreated": 0, "calls": 52, "unknown_calls": 1,
                                         "lost_calls": 1}
            sandbox = {s["name"]: s for s in state["sandboxes"]}["S"]
            assert sandbox["memory_budget_bytes"] == 1 << 30
            running = {c["call_id"]: c for c in state["running_calls"]}
            assert set(calls) <= set(running) and all(running[c]["adopted"] == 1 for c in calls)
            # the orphan (owner gone, cgroup empty) and the stray are finished by the daemon itself
            assert wait_until(lambda: {r["call_id"] for r in d.records()} >= {orphan, lost, "stray-1"})
            held_s = time.monotonic() - last_begun_s
            release.touch()
            for proc in procs:
                assert proc.wait(10) == 0
            for call_id in calls:
                record = d.result("toolcall.end", call_id=call_id, exit_code=0)["record"]
                # the record spans the restart: from the begin, not from the adoption
                assert record["outcome"] == "ok" and record["duration_s"] >= held_s, record
        finally:
            for proc in procs:
                proc.kill()
                proc.wait()
        by_id = {r["call_id"]: r for r in d.records()}
        assert set(calls) <= set(by_id) and len(by_id) == 53
        assert by_id[lost]["extra"] == {"lost": True} and "vanished" in by_id[lost]["message"]
        assert by_id["stray-1"]["tool"] == "unknown" and by_id[orphan]["tool"] == "orphan"
        assert not d.result("state")["running_calls"]
        # a finished call's cgroup is removed by the daemon's removal thread after its answer
        assert wait_until(lambda: tree.children("S/tools") == []), tree.children("S/tools")


def test_sigterm_leaves_calls_for_the_next_daemon_and_removes_its_socket():
    with daemon_process() as d:
        d.result("sandbox.create", name="S")
        begun = d.result("toolcall.begin", sandbox="S", tool="sleep")
        proc = _spawn_into(begun["cgroup_procs"], ["sleep", "30"])
        try:
            assert d.stop() == 0
            assert not d.socket_path.exists() and proc.poll() is None
            d.start()
            assert begun["call_id"] in {c["call_id"] for c in d.result("state")["running_calls"]}
        finally:
            proc.kill()
            proc.wait()
        assert d.result("toolcall.end", call_id=begun["call_id"], signal=9)["record"]["outcome"] == "signaled"


def test_sandbox_remove_kills_its_calls_and_forgets_it():
    with daemon_process() as d:
        d.result("sandbox.create", name="S", pids_max=100, cpu_weight=300)
        assert d.result("sandbox.update", name="S", priority="high")["priority"] == "high"
        begun = d.result("toolcall.begin", sandbox="S", tool="sleep")
        proc = _spawn_into(begun["cgroup_procs"], ["sleep", "30"])
        assert d.result("sandbox.remove", name="S") == {}
        assert proc.wait(10) == -9
        assert d.result("sandbox.list")["sandboxes"] == []
        assert [r["call_id"] for r in d.records()] == [begun["call_id"]]


HOG = "import time; x = b'x' * (232 << 20); print('ready', flush=True); time.sleep(60)"


def test_policy_tick_freezes_then_kills_a_call_near_the_sandbox_budget():
    """Policy `agentcg` live: a call growing to ~91% of its sandbox's budget is stopped by the
    policy (frozen and then killed, or killed at once when its growth projects a breach);
    the record carries the policy's message, the metrics the actions and their latency."""
    with daemon_process(policy={"name": "agentcg", "tick_s": 0.1}) as d:
        d.result("sandbox.create", name="A", memory_budget_bytes=256 << 20)
        assert d.result("policy.get")["name"] == "agentcg"
        begun = d.result("toolcall.begin", sandbox="A", tool="hog")
        proc = _spawn_into(begun["cgroup_procs"], [sys.executable, "-c", HOG], stdout=subprocess.PIPE)
        try:
            assert proc.wait(30) == -9
        finally:
            proc.kill()
            proc.wait()
            proc.stdout.close()
        record = d.result("toolcall.end", call_id=begun["call_id"], signal=9)["record"]
        assert record["outcome"] == "policy_killed" and record["policy_action"] == "kill"
        assert "A" in record["message"], record["message"]
        metrics = d.metrics_text()
        kinds = {line.split('kind="')[1].split('"')[0] for line in metrics.splitlines()
                 if line.startswith("agentcg_actions_total{")}
        from agentcg.policies.sandbox import ACTION_KINDS
        assert "kill" in kinds and kinds <= set(ACTION_KINDS), metrics
        count = [line for line in metrics.splitlines() if line.startswith("agentcg_reaction_latency_seconds_count")]
        assert float(count[0].split()[-1]) >= 1
