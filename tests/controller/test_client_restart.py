"""Clients that outlive a daemon restart: `agentcg run` through a real daemon that is
killed with SIGKILL while ten calls run and started again; and `--grace` / `--records`
honoured through the daemon. Real daemon, real cgroups, real processes (eBPF off: the
restart path does not depend on it)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from testutil import wait_until

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the daemon needs root")
PY = sys.executable


def _daemon(**sections):
    from agentcg.controller.daemon.testing import daemon_process
    return daemon_process(**sections)


def _run(d, gate: Path, script: str, *extra: str, env_extra: dict[str, str] | None = None) -> subprocess.Popen:
    env = {**os.environ, "AGENTCG_SOCKET": str(d.socket_path), "AGENTCG_RECONNECT_S": "60", **(env_extra or {})}
    env.pop("AGENTCG_RECORDS", None)
    command = f"while [ ! -e {gate} ]; do sleep 0.02; done; {script}"
    return subprocess.Popen([PY, "-m", "agentcg.cli", "run", "--sandbox", "s1", "--json", *extra, "--",
                             "sh", "-c", command], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _children(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except FileNotFoundError:
        return []


def test_kill9_with_ten_calls_in_flight_every_client_gets_its_status(tmp_path):
    # exit statuses 0..8 and one death by SIGKILL (137, as a shell reports it): all different
    scripts = [f"exit {i}" for i in range(9)] + ["kill -9 $$"]
    expected = list(range(9)) + [137]
    gates = [tmp_path / f"gate{i}" for i in range(10)]
    with _daemon() as d:
        clients = [_run(d, gate, script) for gate, script in zip(gates, scripts)]
        try:
            assert wait_until(lambda: len(d.result("state")["running_calls"]) == 10, timeout_s=60), d.result("state")
            d.kill9()
            for gate in gates[:5]:      # half end while no daemon runs, half after the new one is up
                gate.touch()
            # their commands are done (the clients are past wait() and find no daemon)
            assert wait_until(lambda: not any(_children(c.pid) for c in clients[:5]), timeout_s=60)
            assert all(c.poll() is None for c in clients)     # every client still waits
            d.start()
            for gate in gates[5:]:
                gate.touch()
            outputs = [c.communicate(timeout=120) for c in clients]
        finally:
            for gate in gates:
                gate.touch()
            for c in clients:
                if c.poll() is None:
                    c.kill()
                    c.wait()
        statuses = [c.returncode for c in clients]
        assert statuses == expected, [o[1].decode()[-500:] for o in outputs]
        call_ids = []
        for (_, err), status in zip(outputs, expected):
            lines = err.decode().splitlines()
            record = json.loads(lines[-1])
            assert not record.get("extra", {}).get("unconfirmed"), record   # the new daemon ended it
            call_ids.append(record["call_id"])
            if status == 137:
                assert record["signal"] == 9
            else:
                assert record["exit_code"] == status
        # the clients whose command was still running when the daemon died said so once
        assert sum("retrying" in err.decode() for _, err in outputs) >= 5
        assert all(err.decode().count("retrying") <= 1 for _, err in outputs)
        assert wait_until(lambda: len(d.records()) >= 10, timeout_s=30)
        recorded = [r["call_id"] for r in d.records()]
        assert sorted(recorded) == sorted(call_ids), recorded        # each call recorded exactly once
        by_id = {r["call_id"]: r for r in d.records()}
        for call_id, status in zip(call_ids, expected):
            record = by_id[call_id]
            assert (record["signal"] == 9) if status == 137 else (record["exit_code"] == status), record
        assert d.result("state")["running_calls"] == []


def test_grace_and_records_are_honoured_through_the_daemon(tmp_path):
    records = tmp_path / "mine.jsonl"
    gate = tmp_path / "gate"
    gate.touch()
    # the daemon's own grace period is 60 s: only --grace 0.2 ends this call soon
    with _daemon(limits={"grace_s": 60.0}) as d:
        client = _run(d, gate, "sleep 300 & exit 3", "--grace", "0.2", "--records", str(records))
        _, err = client.communicate(timeout=60)
        assert client.returncode == 3, err.decode()
        record = json.loads(err.decode().splitlines()[-1])
        assert record["policy_action"] == "grace_kill" and record["exit_code"] == 3
        mine = [json.loads(line) for line in records.read_text().splitlines()]
        assert [r["call_id"] for r in mine] == [record["call_id"]]
        assert [r["call_id"] for r in d.records()] == [record["call_id"]]


def test_no_daemon_within_the_bound_still_exits_with_the_status(tmp_path):
    """The daemon dies and none comes back within AGENTCG_RECONNECT_S: the client says so
    and exits with its command's status; the record is left to the next daemon."""
    gate = tmp_path / "gate"
    with _daemon() as d:
        client = _run(d, gate, "exit 7", env_extra={"AGENTCG_RECONNECT_S": "0.5"})
        try:
            assert wait_until(lambda: len(d.result("state")["running_calls"]) == 1, timeout_s=60)
            d.kill9()
            gate.touch()
            _, err = client.communicate(timeout=60)
        finally:
            gate.touch()
            if client.poll() is None:
                client.kill()
                client.wait()
        assert client.returncode == 7, err.decode()
        text = err.decode()
        assert "retrying" in text and "gave up" in text
        assert json.loads(text.splitlines()[-1])["extra"]["unconfirmed"] is True
        d.start()    # the next daemon adopts the call (its owner is gone) and records it once
        assert wait_until(lambda: len(d.records()) == 1, timeout_s=30), d.log()


MiB = 1 << 20


def test_a_begin_lost_in_a_kill9_is_resent_and_the_command_runs_once(tmp_path):
    """The daemon is killed while the call's toolcall.begin waits for admission (it reached
    the daemon, which never answered): the client resends the begin with its request_key
    to the next daemon, which answers with the adopted call; the command runs exactly once
    and the client exits with its status."""
    marker = tmp_path / "ran"
    gate = tmp_path / "gate"
    gate.touch()
    with _daemon(policy={"name": "agentcg", "tick_s": 0.1, "max_wait_s": 50, "lookahead_s": 0}) as d:
        d.result("sandbox.create", name="s1", memory_budget_bytes=64 * MiB)
        client = _run(d, gate, f"echo ran >> {marker}; exit 7", "--mem-hint", "200M")
        try:
            assert wait_until(lambda: d.result("state")["pending_calls"], timeout_s=60), d.log()
            [pending] = d.result("state")["pending_calls"]
            d.kill9()
            assert client.poll() is None and not marker.exists()     # it never started
            d.start()
            # the next daemon adopted the call; the resent begin waits for room there too
            assert wait_until(lambda: d.result("state")["pending_calls"], timeout_s=60), d.log()
            assert [c["call_id"] for c in d.result("state")["running_calls"]] == [pending["call_id"]]
            d.result("sandbox.update", name="s1", memory_budget_bytes=1024 * MiB)   # room now
            _, err = client.communicate(timeout=120)
        finally:
            if client.poll() is None:
                client.kill()
                client.wait()
        assert client.returncode == 7, err.decode()
        assert marker.read_text() == "ran\n"                    # exactly once
        record = json.loads(err.decode().splitlines()[-1])
        assert record["call_id"] == pending["call_id"] and record["exit_code"] == 7
        assert not record.get("extra", {}).get("unconfirmed"), record
        assert "retrying" in err.decode()
        assert [r["call_id"] for r in d.records()] == [pending["call_id"]]      # one call, recorded once


def test_a_repeated_begin_is_the_same_call_and_bad_keys_are_refused():
    with _daemon() as d:
        d.result("sandbox.create", name="s1")
        d.result("sandbox.create", name="s2")
        first = d.result("toolcall.begin", sandbox="s1", tool="t", request_key="k" * 22)
        again = d.result("toolcall.begin", sandbox="s1", tool="t", request_key="k" * 22)
        assert again["call_id"] == first["call_id"] and again["repeated"] is True
        assert again["cgroup_procs"] == first["cgroup_procs"] and "repeated" not in first
        assert len(d.result("state")["running_calls"]) == 1
        other = d.request("toolcall.begin", sandbox="s2", tool="t", request_key="k" * 22)
        assert other["error"]["code"] == "invalid_input" and "sandbox" in other["error"]["message"]
        for bad in ("short", "x" * 65, "has space!", 5):
            refused = d.request("toolcall.begin", sandbox="s1", request_key=bad)
            assert refused["error"]["code"] == "invalid_input" and "request_key" in refused["error"]["message"]
        # without a key a begin is a new call, as for clients older than the key
        plain = d.result("toolcall.begin", sandbox="s1", tool="t")
        assert plain["call_id"] != first["call_id"]
        d.result("toolcall.end", call_id=plain["call_id"], exit_code=0)
        d.result("toolcall.end", call_id=first["call_id"], exit_code=0)
        # the key of an ended call names no running call any more: a new call
        fresh = d.result("toolcall.begin", sandbox="s1", tool="t", request_key="k" * 22)
        assert fresh["call_id"] != first["call_id"]
        d.result("toolcall.end", call_id=fresh["call_id"], exit_code=0)
