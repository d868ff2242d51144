"""`agentcg doctor` as a user runs it: the installed entry point, on the real host."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

from agentcg.cli import main
from agentcg.controller.doctor import CHECK_NAMES


def _agentcg() -> list[str]:
    script = Path(sys.executable).with_name("agentcg")
    return [str(script)] if script.exists() else [shutil.which("agentcg") or "agentcg"]


def test_json_from_the_entry_point():
    done = subprocess.run(_agentcg() + ["doctor", "--json"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    assert data["core_ok"] is True and data["core_failures"] == []
    assert [c["name"] for c in data["checks"]] == list(CHECK_NAMES)
    assert data["elapsed_s"] > 0


def test_table_names_every_check_and_the_fixes(capsys):
    assert main(["doctor"]) == 0
    out = capsys.readouterr().out.splitlines()
    rows = [line.split()[0] for line in out if line and not line.startswith(" ")]
    assert rows[: len(CHECK_NAMES)] == list(CHECK_NAMES)
    assert out[-1].startswith("core (BPF and cgroups): ok; probed in ")
    not_ok = [line.split()[0] for line in out if line.split()[1:2] in (["missing"], ["unsupported"])]
    fixes = [line for line in out if line.startswith(" ") and line.strip().startswith("fix: ")]
    assert len(fixes) >= len(not_ok)
