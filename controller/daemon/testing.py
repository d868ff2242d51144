"""A real daemon in a subprocess for tests and benchmarks, on a temporary socket, state
directory and cgroup root (`agentcg-test-<random>`), always cleaned up:

    with daemon_process(ebpf={"mode": "off"}) as d:
        d.request("sandbox.create", name="A")            # -> the response object
        d.kill9(); d.start()                             # restart-safety checks

`cleanup()` stops the daemon, removes the cgroup root in every hierarchy and the
temporary directory. Nothing here is used by the daemon itself.
"""
from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any, Iterator


def toml_text(sections: dict[str, dict[str, Any]]) -> str:
    """A TOML document from {section: {key: str | int | float | bool | list}}."""
    lines = []
    for section, values in sections.items():
        lines.append(f"[{section}]")
        for key, value in values.items():
            lines.append(f"{key} = {json.dumps(value)}")
    return "\n".join(lines) + "\n"


class DaemonProcess:
    def __init__(self, sections: dict[str, dict[str, Any]] | None = None) -> None:
        self.workdir = Path(tempfile.mkdtemp(prefix="acgd-", dir="/tmp"))
        os.chmod(self.workdir, 0o755)          # non-root test clients must reach the socket
        self.root = f"agentcg-test-{secrets.token_hex(4)}"
        self.socket_path = self.workdir / "d.sock"
        self.state_dir = self.workdir / "state"
        self.records_path = self.workdir / "records.jsonl"
        self.log_path = self.workdir / "daemon.log"
        config: dict[str, dict[str, Any]] = {
            "daemon": {"socket_path": str(self.socket_path), "cgroup_root": self.root,
                       "state_dir": str(self.state_dir), "records_path": str(self.records_path)},
            "metrics": {"address": "127.0.0.1:0"},
            "ebpf": {"mode": "off"},
            "limits": {"grace_s": 0.5},
        }
        for section, values in (sections or {}).items():
            config.setdefault(section, {}).update(values)
        self.config_path = self.workdir / "agentcg.toml"
        self.config_path.write_text(toml_text(config))
        self.proc: subprocess.Popen | None = None
        self._ids = 0

    # ---- lifetime ------------------------------------------------------------------
    def start(self, timeout_s: float = 30.0) -> None:
        log = open(self.log_path, "ab")
        try:
            self.proc = subprocess.Popen([sys.executable, "-m", "agentcg.cli", "daemon", "--config",
                                          str(self.config_path)], stdout=log, stderr=log)
        finally:
            log.close()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the daemon exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if self.request("ping").get("ok"):
                    return
            except OSError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"the daemon did not answer within {timeout_s} s:\n{self.log()}")

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self, timeout_s: float = 15.0) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(10)

    def cleanup(self) -> None:
        try:
            self.stop()
        finally:
            try:
                from agentcg.controller.cgroup import open_tree
                from agentcg.controller.daemon.claims import ROOT_LOCK_DIR
                tree = open_tree(root=self.root)
                if tree.exists(""):
                    tree.remove("", timeout_s=10.0)
                (ROOT_LOCK_DIR / f"{self.root}.lock").unlink(missing_ok=True)   # left by a kill -9
            finally:
                shutil.rmtree(self.workdir, ignore_errors=True)

    def log(self) -> str:
        try:
            return self.log_path.read_text()[-4000:]
        except OSError:
            return ""

    # ---- talking to it --------------------------------------------------------------
    def connect(self, timeout_s: float = 30.0) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout_s)
        try:
            sock.connect(str(self.socket_path))
        except OSError:
            sock.close()
            raise
        return sock

    def request(self, op: str, **args: Any) -> dict[str, Any]:
        """One request on a fresh connection; the whole response object."""
        self._ids += 1
        with contextlib.closing(self.connect()) as sock:
            sock.sendall(json.dumps({"v": 1, "id": self._ids, "op": op, "args": args}).encode() + b"\n")
            return json.loads(read_line(sock))

    def result(self, op: str, **args: Any) -> dict[str, Any]:
        """The result of a request that must succeed."""
        response = self.request(op, **args)
        if not response.get("ok"):
            raise AssertionError(f"{op} {args} failed: {response}")
        return response["result"]

    def records(self) -> list[dict[str, Any]]:
        if not self.records_path.exists():
            return []
        return [json.loads(line) for line in self.records_path.read_text().splitlines() if line.strip()]

    def metrics_text(self) -> str:
        address = self.result("state")["metrics_address"]
        with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as response:
            return response.read().decode()


def read_line(sock: socket.socket, limit: int = 1 << 20) -> bytes:
    data = b""
    while not data.endswith(b"\n"):
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
        if len(data) > limit:
            break
    return data


@contextlib.contextmanager
def daemon_process(**sections: dict[str, Any]) -> Iterator[DaemonProcess]:
    d = DaemonProcess(sections)
    try:
        d.start()
        yield d
    finally:
        d.cleanup()
