"""`agentcg import`, `agentcg report` and `agentcg profile` through agentcg.cli.main:
output, files written and exit codes."""
from __future__ import annotations

import json
import subprocess
import sys

from agentcg.cli import main
from agentcg.profiler.trace import MANIFEST, TRACE_VERSION, read_trace, write_trace


def test_import_and_report_small_dataset(small_dataset, tmp_path, capsys):
    out = tmp_path / "trace"
    assert main(["import", "agentcgroup", str(small_dataset), "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "tasks: 3 imported, 0 skipped" in printed
    assert read_trace(out).sessions.shape[0] == 3
    assert main(["import", "agentcgroup", str(small_dataset), "-o", str(out)]) == 2
    assert "already exists; pass --force" in capsys.readouterr().err
    assert main(["report", str(out), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["aggregate"]["sessions"] == 3 and len(data["sessions"]) == 3


def test_import_reports_skips_and_strict_fails(small_dataset, tmp_path, capsys):
    broken = sorted(small_dataset.iterdir())[0]
    (broken / "meta.json").write_text("{not json")
    out = tmp_path / "trace"
    assert main(["import", "agentcgroup", str(small_dataset), "-o", str(out)]) == 1   # a task yielded nothing
    captured = capsys.readouterr()
    assert "tasks: 2 imported, 1 skipped" in captured.out
    assert f"skipped {broken.name}: meta.json: broken JSON" in captured.err
    assert main(["import", "agentcgroup", str(small_dataset), "-o", str(tmp_path / "t2"), "--strict"]) == 2
    assert "1 task folder(s) skipped" in capsys.readouterr().err
    assert not (tmp_path / "t2").exists()


def test_report_exit_codes(synthetic_trace, tmp_path, capsys):
    path = write_trace(synthetic_trace, tmp_path / "t")
    assert main(["report", str(path), "--burst-threshold", "300 parsecs"]) == 2
    assert main(["report", str(path), "--session", "nope"]) == 2
    assert "no such session" in capsys.readouterr().err
    manifest = json.loads((path / MANIFEST).read_text())
    manifest["version"] = 99
    (path / MANIFEST).write_text(json.dumps(manifest))
    assert main(["report", str(path)]) == 1
    assert f"trace version 99 is not supported (this agentcg reads version {TRACE_VERSION})" in \
        capsys.readouterr().err
    assert main(["report", str(tmp_path / "absent")]) == 1


def test_report_plots(synthetic_trace, tmp_path, capsys):
    path = write_trace(synthetic_trace, tmp_path / "t")
    plots = tmp_path / "plots"
    assert main(["report", str(path), "--plots", str(plots)]) == 0
    assert "peak-to-mean memory" in capsys.readouterr().out
    pngs = sorted(p.name for p in plots.iterdir())
    assert pngs == ["session-s1.png", "tools-peak-memory.png"]
    for name in pngs:
        data = (plots / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000


def test_profile_refuses_a_bad_interval(capsys):
    # the real recordings are tested in test_profile.py, below an agentcg-test- cgroup root
    assert main(["profile", "--interval", "1ms", "--", "true"]) == 2
    assert "--interval" in capsys.readouterr().err


def test_help_imports_no_pandas():
    code = "import sys; from agentcg.cli import main; main(['--help']); " \
           "sys.exit('pandas' in sys.modules or 'matplotlib' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "report" in done.stdout
