"""Engine links of a real daemon (a subprocess on a temporary socket and cgroup root): the
test plays the engine, speaking raw engine-protocol JSON lines over the daemon's socket
(the peer of a protocol test, not a mock), while tool calls begin and end through the
socket API like an agent's would."""
from __future__ import annotations

import json
import os
import socket

import pytest
from prometheus_client.parser import text_string_to_metric_families

from agentcg.controller.daemon.testing import daemon_process, read_line
from agentcg.engine_protocol import (
    Action, Bandwidth, DirectiveResult, EventKind, KvGeometry, KvUsage, Register, RequestEvent, Tier, TierCapacity,
    decode, encode,
)
from testutil import wait_until

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the daemon creates cgroups: run the tests as root")

GEOMETRY = KvGeometry(layers=2, kv_heads=2, head_dim=64, dtype_bytes=2)     # 1 KiB per token
REGISTER = Register("fake-engine", "test", GEOMETRY,
                    (TierCapacity(Tier.GPU, 64 << 20), TierCapacity(Tier.HOST, 256 << 20),
                     TierCapacity(Tier.SSD, 1 << 30)),
                    (Bandwidth(Tier.GPU, Tier.HOST, 10e9), Bandwidth(Tier.HOST, Tier.GPU, 10e9)))


class FakeEngine:
    """The engine side of one link: JSON lines both ways."""

    def __init__(self, d) -> None:
        self.sock = d.connect(timeout_s=5.0)
        self.buf = b""
        self.sock.sendall(b'{"v": 1, "id": 1, "op": "engine.attach", "args": {}}\n' + encode(REGISTER))
        self.attached = json.loads(self.line())

    def send(self, *messages) -> None:
        self.sock.sendall(b"".join(encode(m) for m in messages))

    def line(self, timeout_s: float = 5.0) -> bytes:
        self.sock.settimeout(timeout_s)
        while b"\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError("the daemon closed the link")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return line

    def directives(self, n: int) -> list:
        return [decode(self.line()) for _ in range(n)]

    def nothing_within(self, timeout_s: float) -> bool:
        try:
            self.line(timeout_s)
        except socket.timeout:
            return True
        return False

    def close(self) -> None:
        self.sock.close()


def _admit(engine: FakeEngine, rid: str, sandbox: str, tokens: int = 1000) -> None:
    engine.send(RequestEvent(rid, rid, EventKind.ADMITTED, 0.0, tokens, sandbox=sandbox), KvUsage(rid, 0.0, tokens))


def _engines(d) -> list[dict]:
    return d.result("state")["engines"]




def _samples(d) -> dict:
    out = {}
    for family in text_string_to_metric_families(d.metrics_text()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_tool_calls_pause_and_resume_the_sandboxes_request_under_the_agentcg_policy():
    with daemon_process() as d:
        d.result("sandbox.create", name="S")
        engine = FakeEngine(d)
        try:
            assert engine.attached["ok"] and engine.attached["result"]["kv_policy"] == "agentcg"
            _admit(engine, "r1", "S")
            _admit(engine, "r2", "other")
            assert wait_until(lambda: _engines(d) and _engines(d)[0]["requests"] == {"running": 2})

            call = d.result("toolcall.begin", sandbox="S", tool="pytest", command="pytest -q")
            # predicted 1 s (nothing learned yet), 1 MB copies in 0.1 ms, the host pool roomy: pin it and write a host copy
            keep, swap = engine.directives(2)
            assert (keep.request_id, keep.action, keep.ttl_s) == ("r1", Action.KEEP, 5.0)   # 1 s x PIN_SLACK 4 + 1 s
            assert (swap.request_id, swap.action, swap.keep_gpu_copy) == ("r1", Action.SWAP_TO_HOST, True)
            engine.send(DirectiveResult("r1", Action.KEEP, True), DirectiveResult("r1", Action.SWAP_TO_HOST, True),
                        KvUsage("r1", 0.0, gpu_tokens=0, host_tokens=1000))   # and the engine needed the GPU
            assert wait_until(lambda: _engines(d)[0]["kv_tokens"] == {"gpu": 1000, "host": 1000, "ssd": 0})
            assert _engines(d)[0]["requests"] == {"paused": 1, "running": 1}

            assert d.result("toolcall.end", call_id=call["call_id"], exit_code=0)["record"]["tool"] == "pytest"
            (prefetch,) = engine.directives(1)      # the call exited: bring the KV back now
            assert (prefetch.request_id, prefetch.action) == ("r1", Action.PREFETCH)
            engine.send(DirectiveResult("r9", Action.PREFETCH, False, "unknown request 'r9'"))
            assert wait_until(lambda: _engines(d)[0]["directives_refused"] == 1)
            assert _engines(d)[0]["requests"] == {"running": 1, "waiting": 1}

            m = _samples(d)
            assert m[("agentcg_engine_links", ())] == 1
            assert m[("agentcg_engine_directives_total", (("action", "swap_to_host"),))] == 1
            assert m[("agentcg_engine_directives_total", (("action", "prefetch"),))] == 1
            assert m[("agentcg_engine_directive_results_total", (("action", "prefetch"), ("result", "refused")))] == 1
            assert m[("agentcg_engine_events_total", (("kind", "paused"), ("source", "daemon")))] == 1
            assert m[("agentcg_engine_events_total", (("kind", "resumed"), ("source", "daemon")))] == 1
            assert m[("agentcg_engine_kv_bytes", (("tier", "host"),))] == 1000 * GEOMETRY.bytes_per_token
            assert not any(name == "agentcg_engine_policy_fallbacks_total" for name, _ in m)
        finally:
            engine.close()
        # the engine went away: its requests are forgotten, the daemon serves on
        assert wait_until(lambda: _engines(d) == [])
        assert _samples(d)[("agentcg_engine_requests", (("state", "paused"),))] == 0
        call = d.result("toolcall.begin", sandbox="S", tool="pytest")
        d.result("toolcall.end", call_id=call["call_id"])


def test_malformed_engine_lines_close_only_that_link():
    with daemon_process(engine={"max_links": 2}) as d:
        bad = FakeEngine(d)
        good = FakeEngine(d)
        third = FakeEngine(d)
        try:
            assert not third.attached["ok"] and third.attached["error"]["code"] == "busy"
            bad.sock.sendall(b'{"v": 1, "type": "request_event", "request_id": "r"}\n')
            error = json.loads(bad.line())
            assert error["error"]["code"] == "invalid_input" and "missing field" in error["error"]["message"]
            with pytest.raises(EOFError):
                bad.line()
            unknown = FakeEngine(d)                 # the bad link's slot is free again
            unknown.sock.sendall(b'{"v": 3, "type": "register"}\n')
            assert "version 3" in json.loads(unknown.line())["error"]["message"]
            unknown.close()
            huge = FakeEngine(d)
            huge.sock.sendall(b"x" * (70 * 1024))
            assert json.loads(huge.line())["error"]["code"] == "too_large"
            huge.close()
            _admit(good, "r1", "S")                 # the good link and the API still work
            assert d.result("ping")["version"] == 1
            assert wait_until(lambda: [e["requests"] for e in _engines(d)] == [{"running": 1}])
            assert _samples(d)[("agentcg_engine_protocol_errors_total", ())] == 2
        finally:
            for engine in (bad, good, third):
                engine.close()


def test_nonroot_peer_may_not_attach_an_engine():
    with daemon_process() as d:
        os.chmod(d.socket_path, 0o666)
        pid = os.fork()
        if pid == 0:                                 # the child: uid 65534 asks to attach
            code = 1
            try:
                os.setgid(65534)
                os.setuid(65534)
                with d.connect() as sock:
                    sock.sendall(b'{"v": 1, "id": 1, "op": "engine.attach"}\n')
                    answer = json.loads(read_line(sock))
                code = 0 if answer["error"]["code"] == "forbidden" else 3
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0


def test_a_policy_that_raises_falls_back_to_vllm_v1_and_is_counted(tmp_path, monkeypatch):
    (tmp_path / "acg_raising_kv_policy.py").write_text(
        "class Raising:\n"
        "    name = 'raising'\n"
        "    shares_host_memory = False\n"
        "    def decide(self, snapshot):\n"
        "        raise RuntimeError('a policy bug')\n"
        "    def observe(self, event):\n"
        "        pass\n")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    with daemon_process(engine={"kv_policy": "acg_raising_kv_policy:Raising"}) as d:
        engine = FakeEngine(d)
        try:
            _admit(engine, "r1", "S")
            assert wait_until(lambda: _engines(d)[0]["requests"] == {"running": 1})
            call = d.result("toolcall.begin", sandbox="S", tool="make")
            (keep,) = engine.directives(1)           # vllm-v1: the paused KV goes to the prefix cache
            assert (keep.request_id, keep.action, keep.ttl_s) == ("r1", Action.KEEP, 0.0)
            d.result("toolcall.end", call_id=call["call_id"])
            m = _samples(d)
            # two decisions, both by vllm-v1: the pause, and the tick at the call's end
            assert m[("agentcg_engine_policy_fallbacks_total", (("policy", "custom"),))] == 2
            assert m[("agentcg_engine_policy_failures_total", (("policy", "custom"),))] >= 1
            assert _engines(d)[0]["policy_failures"] >= 1
        finally:
            engine.close()
