"""The command-line interface: list, info, verify, and a suggestion for a misspelt method."""

from __future__ import annotations

from attnzoo.cli import main


def test_cli_commands(capsys):
    assert main(["list"]) == 0
    assert "sigmoid" in capsys.readouterr().out
    assert main(["info", "sigmoid"]) == 0
    assert "2409.04431" in capsys.readouterr().out
    assert main(["verify", "softmax"]) == 0
    assert "0 failed" in capsys.readouterr().out
    assert main(["info", "sigmod"]) == 2
    assert "did you mean 'sigmoid'" in capsys.readouterr().err
