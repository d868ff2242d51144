"""agentcg.client: local mode (root, no daemon socket) on the real kernel, and daemon mode
against the real daemon in a subprocess (controller/daemon/testing.py), both without eBPF
to stay fast; mode selection and protocol errors."""
from __future__ import annotations

import os
import socket
import sys
import threading
import time

import pytest

from agentcg.client import Client, spawn_into
from agentcg.errors import CgroupGone, DaemonUnavailable, HostUnsupported, InvalidInput, ProtocolError

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="cgroups need root")

PY = sys.executable


@pytest.fixture
def local(cgroup_tree, tmp_path):
    with Client(mode="local", root=cgroup_tree.root, state=tmp_path / "state", records_path=tmp_path / "r.jsonl",
                ebpf=False, grace_s=1.0) as client:
        yield client


def test_auto_mode_picks_local_without_a_socket(tmp_path, monkeypatch):
    monkeypatch.setenv("AGENTCG_SOCKET", str(tmp_path / "none.sock"))
    assert Client(ebpf=False).mode == "local"
    (tmp_path / "none.sock").touch()
    assert Client(ebpf=False).mode == "daemon"
    with pytest.raises(InvalidInput, match="mode"):
        Client(mode="remote")


def test_run_local(local, cgroup_tree, tmp_path):
    result = local.run("s1", [PY, "-c", "import sys; b = bytearray(16 << 20); sys.exit(2)"], tool="alloc")
    assert result.returncode == 2 and result.record.exit_code == 2 and result.record.tool == "alloc"
    assert result.record.peak_memory_bytes >= 16 << 20
    assert not cgroup_tree.exists("s1")
    assert (tmp_path / "r.jsonl").read_text().count("\n") == 1


def test_run_local_missing_program_is_127_with_a_record(local):
    result = local.run("s1", ["no-such-program-xyz"])
    assert result.returncode == 127 and result.record.exit_code == 127


def test_tool_call_context_manager(local, cgroup_tree):
    with local.tool_call("s1", "pipeline", "sh -c 'sleep 0.1'") as call:
        proc = call.spawn(["sh", "-c", "sleep 0.1; exit 7"])
        assert proc.pid in cgroup_tree.pids(f"s1/tools/{call.call_id}")
        proc.wait()
    assert call.record.exit_code == 7 and call.record.duration_s >= 0.1
    with pytest.raises(InvalidInput, match="finished"):
        call.spawn(["true"])


def test_bad_sandbox_name(local):
    with pytest.raises(InvalidInput):
        local.run("../x", ["true"])


def test_spawn_into_a_vanished_cgroup(tmp_path):
    with pytest.raises(CgroupGone):
        spawn_into([tmp_path / "gone" / "cgroup.procs"], ["true"])


def test_protocol_errors_from_a_bad_server(tmp_path):
    """A server that answers garbage or closes: a ProtocolError, not a hang or a crash."""
    path = tmp_path / "bad.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(1)

    def serve() -> None:
        conn, _ = server.accept()
        conn.recv(65536)
        conn.sendall(b"not json\n")
        conn.recv(65536)
        conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    client = Client(mode="daemon", socket=path)
    with pytest.raises(ProtocolError, match="invalid JSON"):
        client.request("ping")
    with pytest.raises(DaemonUnavailable, match="closed") as info:   # a transport failure, not a refusal
        client.request("ping")
    assert info.value.request_sent
    client.close()
    thread.join(5)
    server.close()
    with pytest.raises(DaemonUnavailable, match="cannot connect") as info:
        Client(mode="daemon", socket=tmp_path / "absent.sock").request("ping")
    assert isinstance(info.value, HostUnsupported) and not info.value.request_sent


def test_daemon_mode_against_the_real_daemon():
    try:
        from agentcg.controller.daemon.testing import daemon_process
    except ImportError as exc:
        pytest.skip(f"the daemon is not available yet: {exc}")
    with daemon_process(ebpf={"mode": "off"}) as d:
        with Client(mode="daemon", socket=d.socket_path) as client:
            assert client.request("ping")["version"] == 1
            result = client.run("s1", [PY, "-c", "b = bytearray(8 << 20)"], tool="alloc")
            assert result.returncode == 0 and result.record.tool == "alloc"
            assert result.record.peak_memory_bytes >= 8 << 20
            with client.tool_call("s1", "sleep", ["sleep", "0.05"]) as call:
                proc = call.spawn(["sh", "-c", "exit 4"])
                proc.wait()
            assert call.record.exit_code == 4
            with pytest.raises(InvalidInput, match="daemon refused"):
                client.begin("bad/name", "x", "x")
        assert {r["call_id"] for r in d.records()} >= {result.record.call_id, call.record.call_id}


def test_a_call_longer_than_the_daemons_idle_timeout_still_ends():
    """The daemon closes idle connections; a tool call outlasting that must still get its
    record: the client reconnects instead of failing on the dead connection."""
    from agentcg.controller.daemon.testing import daemon_process

    with daemon_process(ebpf={"mode": "off"}, protocol={"idle_timeout_s": 1.0}) as d:
        with Client(mode="daemon", socket=d.socket_path) as client:
            with client.tool_call("s1", "sleep", ["sleep", "2"]) as call:
                call.spawn(["sleep", "2"]).wait()    # the connection idles past 1 s meanwhile
            assert call.record.exit_code == 0 and call.record.duration_s >= 2.0
            assert client.request("ping")["version"] == 1


def test_daemon_link_waits_for_a_daemon_that_comes_up_and_says_so_once(tmp_path):
    """retry="unsent": no socket yet -> bounded back-off until a server listens; one line
    on stderr. retry="none" fails at once. A real Unix socket server in a thread."""
    import io
    import json as _json

    from agentcg.controller.daemon_client import DaemonLink

    path = tmp_path / "late.sock"
    with pytest.raises(DaemonUnavailable):
        DaemonLink(path, reconnect_s=5).request("ping", {})
    started = threading.Event()

    def serve_later() -> None:
        time.sleep(0.3)
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        server.bind(str(path))
        server.listen(1)
        started.set()
        conn, _ = server.accept()
        request = _json.loads(conn.recv(65536))
        conn.sendall(_json.dumps({"v": 1, "id": request["id"], "ok": True, "result": {"pong": 1}}).encode() + b"\n")
        conn.close()
        server.close()

    thread = threading.Thread(target=serve_later, daemon=True)
    thread.start()
    stderr = io.StringIO()
    link = DaemonLink(path, reconnect_s=30, stderr=stderr)
    assert link.request("ping", {}, retry="unsent") == {"pong": 1}
    assert started.is_set()
    assert stderr.getvalue().count("retrying for up to 30 s") == 1, stderr.getvalue()
    link.close()
    thread.join(5)
    with pytest.raises(DaemonUnavailable, match="gave up after 0.2 s"):
        DaemonLink(tmp_path / "never.sock", reconnect_s=0.2, stderr=io.StringIO()).request("ping", {}, retry="any")


def test_reconnect_bound_from_the_environment(monkeypatch):
    from agentcg.controller.daemon_client import DEFAULT_RECONNECT_S, reconnect_seconds

    monkeypatch.delenv("AGENTCG_RECONNECT_S", raising=False)
    assert reconnect_seconds() == DEFAULT_RECONNECT_S
    monkeypatch.setenv("AGENTCG_RECONNECT_S", "7.5")
    assert reconnect_seconds() == 7.5 and reconnect_seconds(3) == 3.0
    monkeypatch.setenv("AGENTCG_RECONNECT_S", "soon")
    with pytest.raises(InvalidInput, match="AGENTCG_RECONNECT_S"):
        reconnect_seconds()
    with pytest.raises(InvalidInput):
        reconnect_seconds(-1)
