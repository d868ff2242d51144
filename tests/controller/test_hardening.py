"""Issue 12, one test per defect, on the real daemon, kernel cgroups and processes.

Non-root cases run as uid 65534 (`nobody`) under the system python, speaking the
protocol themselves (the venv may not be readable by nobody). Every test makes its
cgroups below its own `agentcg-test-*` root (DaemonProcess) and removes them.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from agentcg.controller.daemon.testing import DaemonProcess, daemon_process, read_line, toml_text
from testutil import wait_until

NOBODY = 65534
pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the daemon and the non-root cases need root")


def _spawn_into(procs_files, argv, **kw):
    from agentcg.client import spawn_into
    return spawn_into([Path(p) for p in procs_files], argv, **kw)


def _demote() -> None:
    os.setgroups([])
    os.setgid(NOBODY)
    os.setuid(NOBODY)


def _raw(d, payload: bytes) -> dict:
    with d.connect() as sock:
        sock.sendall(payload)
        return json.loads(read_line(sock))


def _tree(d):
    from agentcg.controller.cgroup import open_tree
    return open_tree(root=d.root)


# ---- 1. pid reuse --------------------------------------------------------------------------
def _connect_as(d, tree, sandbox: str) -> tuple[socket.socket, int]:
    """A socket connected by a child of ours living in `sandbox`/agent as nobody; the child
    has exited (and is reaped) when this returns, the connection lives on in our fd."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(r)
            tree.attach(f"{sandbox}/agent", os.getpid())
            _demote()
            sock.connect(str(d.socket_path))
            sock.sendall(b'{"v": 1, "id": 0, "op": "ping"}\n')      # answered: the daemon accepted us
            read_line(sock)
            os.write(w, b"1")
        finally:
            os._exit(0)
    os.close(w)
    assert os.read(r, 1) == b"1"
    os.close(r)
    os.waitpid(pid, 0)
    return sock, pid


def _process_with_pid(tree, sandbox: str, pid: int, attempts: int = 200) -> subprocess.Popen | None:
    """A `sleep` in `sandbox`/agent whose pid is `pid` (ns_last_pid), or None."""
    for _ in range(attempts):
        Path("/proc/sys/kernel/ns_last_pid").write_text(str(pid - 1))
        proc = subprocess.Popen(["sleep", "60"])
        if proc.pid == pid:
            tree.attach(f"{sandbox}/agent", proc.pid)
            return proc
        proc.kill()
        proc.wait()
    return None


def test_a_recycled_peer_pid_does_not_grant_the_new_process_rights():
    with daemon_process(daemon={"socket_mode": "0666"}) as d:
        d.result("sandbox.create", name="A")
        d.result("sandbox.create", name="B")
        tree = _tree(d)
        victim_call = d.result("toolcall.begin", sandbox="B", tool="sleep")["call_id"]
        sock, dead_pid = _connect_as(d, tree, "A")
        impostor = _process_with_pid(tree, "B", dead_pid)
        if impostor is None:
            sock.close()
            pytest.skip(f"could not get pid {dead_pid} again through ns_last_pid (a busy host)")
        try:
            answers = []
            for op, args in (("toolcall.end", {"call_id": victim_call}), ("sandbox.get", {"name": "B"}),
                             ("toolcall.begin", {"sandbox": "B", "tool": "x"})):
                sock.sendall(json.dumps({"v": 1, "id": 1, "op": op, "args": args}).encode() + b"\n")
                answers.append(json.loads(read_line(sock)))
            for response in answers:
                assert not response["ok"] and response["error"]["code"] == "forbidden", response
                assert "sandbox 'A'" in response["error"]["message"], response
            assert victim_call in {c["call_id"] for c in d.result("state")["running_calls"]}
        finally:
            sock.close()
            impostor.kill()
            impostor.wait()


# ---- 2. the v1 budget escape ---------------------------------------------------------------
BEGIN_AND_WAIT = textwrap.dedent("""
    import json, os, socket, subprocess, sys
    sock = socket.socket(socket.AF_UNIX); sock.connect(sys.argv[1])
    reader = sock.makefile("rb")
    def request(op, **args):
        sock.sendall(json.dumps({"v": 1, "id": 1, "op": op, "args": args}).encode() + b"\\n")
        return json.loads(reader.readline())
    begun = request("toolcall.begin", sandbox=sys.argv[2], tool="sleep")["result"]
    fds = [os.open(p, os.O_WRONLY) for p in begun["cgroup_procs"]]
    def join():
        for fd in fds:
            os.write(fd, b"0")
    child = subprocess.Popen(["sleep", "60"], preexec_fn=join)
    attach = request("toolcall.attach", call_id=begun["call_id"], pid=child.pid) if begun.get("attach_needed") else None
    print(json.dumps({"begun": begun, "child": child.pid, "attach": attach}), flush=True)
    sys.stdin.read()
    child.kill()
""")

MOVE_SELF = textwrap.dedent("""
    import json, os, sys
    out = {}
    for path in sys.argv[1:]:
        try:
            with open(path, "w") as f:
                f.write(str(os.getpid()))
            out[path] = "moved"
        except OSError as exc:
            out[path] = exc.strerror
    print(json.dumps(out))
""")


def test_a_process_of_one_sandbox_cannot_move_into_another_sandboxes_call():
    from agentcg.controller.sandbox import call_path, procs_files

    with daemon_process(daemon={"socket_mode": "0666"}) as d:
        d.result("sandbox.create", name="A", memory_budget_bytes=256 << 20)
        d.result("sandbox.create", name="B")
        tree = _tree(d)
        owner = tree.spawn("B/agent", ["/usr/bin/python3", "-c", BEGIN_AND_WAIT, str(d.socket_path), "B"],
                           preexec_fn=_demote, stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd="/")
        try:
            out = json.loads(owner.stdout.readline())
            begun = out["begun"]
            all_files = procs_files(tree, call_path("B", begun["call_id"]))
            # a same-uid process of sandbox A tries to move itself into B's call: refused everywhere
            intruder = tree.spawn("A/agent", ["/usr/bin/python3", "-c", MOVE_SELF, *map(str, all_files)],
                                  preexec_fn=_demote, stdout=subprocess.PIPE, cwd="/")
            moved = json.loads(intruder.communicate(timeout=30)[0])
            assert all(result != "moved" for result in moved.values()), moved
            # the peer is given the v2 file only; the daemon moved its child into the rest
            assert begun["cgroup_procs"] == [str(all_files[0])]
            assert begun["attach_needed"] == (len(all_files) > 1)
            if begun["attach_needed"]:
                assert out["attach"]["ok"], out["attach"]
            for path in all_files:
                assert str(out["child"]) in path.read_text().split(), path
                assert path.stat().st_uid == (NOBODY if path == all_files[0] else 0), path
        finally:
            owner.stdin.close()
            owner.wait(30)
            owner.stdout.close()


# ---- 3. lock-out ------------------------------------------------------------------------------
HOLD_CONNECTIONS = textwrap.dedent("""
    import json, socket, sys, time
    held, busy = [], 0
    for _ in range(int(sys.argv[2])):
        s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])
        s.setblocking(False)
        held.append(s)
    time.sleep(1.0)
    for s in held:
        try:
            if b'"busy"' in s.recv(4096):
                busy += 1
        except BlockingIOError:
            pass
    print(json.dumps({"held": len(held) - busy, "busy": busy}), flush=True)
    sys.stdin.read()
""")


@pytest.mark.parametrize("per_uid", [64, 256])
def test_idle_non_root_connections_cannot_lock_root_out(per_uid):
    with daemon_process(daemon={"socket_mode": "0666"},
                        protocol={"max_connections_per_uid": per_uid, "root_connections": 16}) as d:
        hog = subprocess.Popen(["/usr/bin/python3", "-c", HOLD_CONNECTIONS, str(d.socket_path), "256"],
                               preexec_fn=_demote, stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd="/")
        try:
            counts = json.loads(hog.stdout.readline())
            assert counts == {"held": min(per_uid, 240), "busy": 256 - min(per_uid, 240)}, counts
            env = {**os.environ, "AGENTCG_SOCKET": str(d.socket_path)}
            run = subprocess.run([sys.executable, "-m", "agentcg.cli", "run", "--sandbox", "S", "--", "true"], env=env,
                                 capture_output=True, text=True, timeout=60)
            assert run.returncode == 0, run.stderr
            assert d.records()[-1]["tool"] == "true"
        finally:
            hog.stdin.close()
            hog.wait(30)
            hog.stdout.close()


def test_one_sandbox_cannot_take_every_running_call_slot():
    with daemon_process(limits={"max_running_calls_per_sandbox": 2}) as d:
        d.result("sandbox.create", name="A")
        d.result("sandbox.create", name="B")
        for _ in range(2):
            d.result("toolcall.begin", sandbox="A", tool="x")
        response = d.request("toolcall.begin", sandbox="A", tool="x")
        assert response["error"]["code"] == "busy"
        assert "max_running_calls_per_sandbox" in response["error"]["message"]
        assert "'A'" in response["error"]["message"]
        d.result("toolcall.begin", sandbox="B", tool="x")


# ---- 4. restarts -----------------------------------------------------------------------------
def _run_daemon(config: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "agentcg.cli", "daemon", "--config", str(config)],
                          capture_output=True, text=True, timeout=60)


def _files(directory: Path) -> dict[str, tuple[bytes, int]]:
    return {str(p.relative_to(directory)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(directory.rglob("*")) if p.is_file()}


def test_a_second_daemon_refuses_before_touching_anything(tmp_path):
    with daemon_process() as d:
        d.result("sandbox.create", name="S")
        begun = d.result("toolcall.begin", sandbox="S", tool="sleep")
        proc = _spawn_into(begun["cgroup_procs"], ["sleep", "60"])
        try:
            before = _files(d.state_dir)
            second = _run_daemon(d.config_path)                      # same config: same everything
            assert second.returncode == 2, second.stderr
            assert "another agentcg daemon" in second.stderr and "state directory" in second.stderr
            # same cgroup root, its own state directory and socket
            other = tmp_path / "other.toml"
            other.write_text(toml_text({"daemon": {"socket_path": str(tmp_path / "o.sock"), "cgroup_root": d.root,
                                                   "state_dir": str(tmp_path / "state"),
                                                   "records_path": str(tmp_path / "r.jsonl")},
                                        "metrics": {"address": ""}, "ebpf": {"mode": "off"}}))
            third = _run_daemon(other)
            assert third.returncode == 2, third.stderr
            assert f"manages cgroup root {d.root!r}" in third.stderr
            assert _files(d.state_dir) == before
            reap = subprocess.run([sys.executable, "-m", "agentcg.cli", "reap", "--root", d.root,
                                   "--state-dir", str(d.state_dir)], capture_output=True, text=True, timeout=60)
            assert reap.returncode == 0, reap.stderr
            assert proc.poll() is None and _tree(d).exists(f"S/tools/{begun['call_id']}")
            assert d.result("ping")["daemon_pid"] == d.proc.pid
        finally:
            proc.kill()
            proc.wait()


def test_calls_of_a_killed_daemon_survive_a_reap_until_the_next_daemon_adopts_them():
    with daemon_process() as d:
        d.result("sandbox.create", name="S")
        begun = d.result("toolcall.begin", sandbox="S", tool="sleep")
        proc = _spawn_into(begun["cgroup_procs"], ["sleep", "60"])
        try:
            d.kill9()
            reap = subprocess.run([sys.executable, "-m", "agentcg.cli", "reap", "--root", d.root,
                                   "--state-dir", str(d.state_dir)], capture_output=True, text=True, timeout=60)
            assert reap.returncode == 0, reap.stderr
            assert proc.poll() is None
            d.start()
            assert begun["call_id"] in {c["call_id"] for c in d.result("state")["running_calls"]}
        finally:
            proc.kill()
            proc.wait()


def test_a_corrupt_state_file_is_moved_aside_and_its_calls_adopted_not_killed():
    with daemon_process() as d:
        d.result("sandbox.create", name="S")
        begun = d.result("toolcall.begin", sandbox="S", tool="sleep")
        proc = _spawn_into(begun["cgroup_procs"], ["sleep", "60"])
        try:
            d.kill9()
            (d.state_dir / "state.json").write_text('{"version": 1, "sandboxes": [')
            d.start()
            assert list(d.state_dir.glob("state.json.corrupt-*"))
            running = {c["call_id"]: c for c in d.result("state")["running_calls"]}
            assert begun["call_id"] in running and running[begun["call_id"]]["tool"] == "unknown"
            time.sleep(1.5)                   # three grace periods (0.5 s): nothing kills it
            assert proc.poll() is None
        finally:
            proc.kill()
            proc.wait()
        assert wait_until(lambda: begun["call_id"] in {r["call_id"] for r in d.records()})
        record = {r["call_id"]: r for r in d.records()}[begun["call_id"]]
        assert record["tool"] == "unknown" and record["policy_action"] is None


def test_a_zombie_owner_is_dead():
    begin = textwrap.dedent("""
        import json, socket, sys
        s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])
        s.sendall(b'{"v": 1, "id": 1, "op": "toolcall.begin", "args": {"sandbox": "S", "tool": "z"}}\\n')
        print(json.loads(s.makefile().readline())["result"]["call_id"], flush=True)
    """)
    with daemon_process() as d:
        d.result("sandbox.create", name="S")
        owner = subprocess.Popen([sys.executable, "-c", begin, str(d.socket_path)], stdout=subprocess.PIPE, text=True)
        call_id = owner.stdout.readline().strip()
        # not waited for: the owner stays a zombie until the end of this test
        assert wait_until(lambda: Path(f"/proc/{owner.pid}/stat").read_text().split(")")[1].split()[0] == "Z")
        assert wait_until(lambda: call_id in {r["call_id"] for r in d.records()})
        owner.wait()
        owner.stdout.close()


@pytest.mark.parametrize("signum", [signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2, signal.SIGALRM])
def test_non_fatal_signals_are_ignored(signum):
    with daemon_process() as d:
        d.result("sandbox.create", name="S")
        d.proc.send_signal(signum)
        time.sleep(0.3)
        assert d.proc.poll() is None, d.log()
        assert d.result("ping")["daemon_pid"] == d.proc.pid
        assert wait_until(lambda: f"{signal.Signals(signum).name} ignored" in d.log())
        assert d.stop() == 0


# ---- 5. planted symlinks ---------------------------------------------------------------------
@pytest.fixture
def victim(tmp_path: Path) -> Path:
    path = tmp_path / "victim"
    path.write_text("root's precious file\n")
    return path


def test_the_daemon_never_writes_through_planted_links(victim):
    d = DaemonProcess({"daemon": {"socket_mode": "0666"}})
    try:
        d.state_dir.mkdir(mode=0o755)
        (d.state_dir / "state.json.tmp").symlink_to(victim)        # main's temp name
        (d.state_dir / "locks").mkdir(mode=0o700)
        (d.state_dir / "locks" / f"{d.root}.P.lock").symlink_to(victim)
        d.start()
        d.result("sandbox.create", name="S")                       # state written: not through .tmp
        response = d.request("sandbox.create", name="P")           # its lock file is a link
        assert response["error"]["code"] == "invalid_input" and "symlink" in response["error"]["message"]
        d.stop()
        (d.state_dir / "state.journal").unlink()
        (d.state_dir / "state.journal").symlink_to(victim)
        d.start()          # a state that is a link is not trusted: moved aside, adopted from the tree
        assert "symlink" in d.log()
        assert (d.state_dir / "state.journal").is_file() and not (d.state_dir / "state.journal").is_symlink()
        assert [s["name"] for s in d.result("sandbox.list")["sandboxes"]] == ["S"]
        d.result("sandbox.update", name="S", priority="low")          # appended to the new journal
        assert victim.read_text() == "root's precious file\n"
    finally:
        d.cleanup()


def test_a_forged_owner_file_does_not_make_reap_kill_a_call(tmp_path, cgroup_tree):
    from agentcg.controller.reaper import calls_dir, reap_orphans
    from agentcg.controller.toolcall import ToolCallManager

    mgr = ToolCallManager(cgroup_tree, state=tmp_path)
    call = mgr.begin("S", "sleep", ["sleep", "60"])
    proc = call.spawn(["sleep", "60"])
    try:
        owner_file = calls_dir(tmp_path) / f"{call.call_id}.json"
        data = json.loads(owner_file.read_text())
        data["owner_pid"] = 999999                                  # "its owner is dead"
        owner_file.unlink()
        owner_file.write_text(json.dumps(data))
        os.chown(owner_file, NOBODY, NOBODY)                        # planted by another user
        assert reap_orphans(cgroup_tree, tmp_path) == []
        assert proc.poll() is None and cgroup_tree.exists(call.path)
    finally:
        proc.kill()
        proc.wait()
        owner_file.unlink(missing_ok=True)
        mgr.end(call, grace_s=0)


def test_a_trace_zip_never_follows_a_planted_tmp_link(tmp_path, victim):
    from agentcg.profiler.trace import TABLES, Trace, frame, read_trace, write_trace

    out = tmp_path / "out"
    out.mkdir()
    (out / "x.zip.tmp").symlink_to(victim)
    write_trace(Trace(**{name: frame(name) for name in TABLES}, source="test"), out / "x.zip")
    assert victim.read_text() == "root's precious file\n"
    assert read_trace(out / "x.zip").source == "test"


def test_lock_files_go_with_their_sandbox():
    with daemon_process() as d:
        for i in range(20):
            d.result("sandbox.create", name=f"s{i}")
            d.result("sandbox.remove", name=f"s{i}")
        d.result("toolcall.begin", sandbox="eph", tool="x")       # an ephemeral sandbox, ended below
        call_id = d.result("state")["running_calls"][0]["call_id"]
        d.result("toolcall.end", call_id=call_id)
        locks = sorted(p.name for p in (d.state_dir / "locks").iterdir())
        assert locks == [], locks


# ---- 6. smaller ------------------------------------------------------------------------------
def test_the_records_file_is_private_by_default():
    with daemon_process() as d:
        d.records_path.write_text("")
        os.chmod(d.records_path, 0o644)                            # left by an older agentcg
        d.result("toolcall.begin", sandbox="S", tool="t", command=["tool", "--token=secret"])
        call_id = d.result("state")["running_calls"][0]["call_id"]
        d.result("toolcall.end", call_id=call_id)
        assert d.records_path.stat().st_mode & 0o777 == 0o600
        reader = subprocess.run(["cat", str(d.records_path)], preexec_fn=_demote, capture_output=True)
        assert reader.returncode != 0 and b"secret" not in reader.stdout


def test_the_records_file_may_be_given_to_the_socket_group():
    with daemon_process(daemon={"records_mode": "0640", "socket_group": "nogroup"}) as d:
        d.result("toolcall.begin", sandbox="S", tool="t")
        d.result("toolcall.end", call_id=d.result("state")["running_calls"][0]["call_id"])
        st = d.records_path.stat()
        assert (st.st_mode & 0o777, st.st_gid) == (0o640, NOBODY)


def test_deep_json_and_huge_integers_are_invalid_input_not_internal():
    with daemon_process() as d:
        payloads = [b"[" * 1000 + b"]" * 1000 + b"\n",
                    b'{"v": 1, "id": 1, "op": "ping", "args": ' + b'{"a": ' * 1000 + b"1" + b"}" * 1001 + b"\n",
                    b'{"v": 1, "id": ' + b"9" * 5000 + b', "op": "ping"}\n',
                    b'{"v": 1, "id": 1, "op": "ping", "args": {"x": ' + b"1" * 4400 + b"}}\n"]
        for payload in payloads:
            response = _raw(d, payload)
            assert not response["ok"] and response["error"]["code"] == "invalid_input", response
            assert "Error" not in response["error"]["message"], response
        assert d.result("ping")
        assert "Traceback" not in d.log()


def _write_trace_dir(path: Path, **manifest_changes) -> Path:
    from agentcg.profiler.trace import MANIFEST, TABLES, Trace, frame, write_trace

    write_trace(Trace(**{name: frame(name) for name in TABLES}, source="test"), path)
    manifest = json.loads((path / MANIFEST).read_text())
    manifest.update(manifest_changes)
    (path / MANIFEST).write_text(json.dumps(manifest))
    return path


@pytest.mark.parametrize("case", ["tables-string", "tables-int", "created-not-number", "plots-unwritable",
                                  "binary-config", "profile-into-missing-dir"])
def test_cli_inputs_that_crashed_exit_2_with_a_clear_error(case, tmp_path, capsys):
    from agentcg.cli import main

    blocker = tmp_path / "a-file"
    blocker.write_text("")
    if case == "tables-string":
        argv = ["report", str(_write_trace_dir(tmp_path / "t", tables="sessions toolcalls samples"))]
        words = "'tables' must map"
    elif case == "tables-int":
        argv = ["report", str(_write_trace_dir(tmp_path / "t", tables=7))]
        words = "'tables' must map"
    elif case == "created-not-number":
        argv = ["report", str(_write_trace_dir(tmp_path / "t", created_s="yesterday"))]
        words = "'created_s' must be a number"
    elif case == "plots-unwritable":
        argv = ["report", str(_write_trace_dir(tmp_path / "t")), "--plots", str(blocker / "charts")]
        words = "cannot write charts there"
    elif case == "binary-config":
        config = tmp_path / "agentcg.toml"
        config.write_bytes(bytes(range(256)))
        argv = ["daemon", "--config", str(config)]
        words = "not a TOML text file"
    else:
        argv = ["profile", "-o", str(blocker / "missing" / "x.zip"), "--", "true"]
        words = "cannot create its directory"
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err, err
