"""The top-level CLI: lazy loading, exit codes, error translation."""
import subprocess
import sys

import click

from agentcg import cli as cli_module
from agentcg.errors import InvalidInput


def test_help_imports_no_heavy_module():
    code = ("import sys; from agentcg.cli import main; rc = main(['--help']);"
            "heavy = [m for m in ('pandas', 'torch', 'bcc', 'matplotlib', 'pyarrow') if m in sys.modules];"
            "print(rc, heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().endswith("0 []"), out


def test_ctx_exit_code_is_returned(monkeypatch):
    @click.command()
    def fake():
        click.get_current_context().exit(7)

    monkeypatch.setitem(cli_module.COMMANDS, "fake", ("agentcg.cli", "_fake_for_test", "test"))
    monkeypatch.setattr(cli_module, "_fake_for_test", fake, raising=False)
    assert cli_module.main(["fake"]) == 7


def test_agentcg_error_becomes_message_and_exit_code(monkeypatch, capsys):
    @click.command()
    def bad():
        raise InvalidInput("size: expected a size such as 512M, got 'x'")

    monkeypatch.setitem(cli_module.COMMANDS, "bad", ("agentcg.cli", "_bad_for_test", "test"))
    monkeypatch.setattr(cli_module, "_bad_for_test", bad, raising=False)
    assert cli_module.main(["bad"]) == 2
    assert "agentcg: error: size: expected a size" in capsys.readouterr().err


def test_unknown_command_is_a_usage_error():
    assert cli_module.main(["no-such-command"]) == 2
