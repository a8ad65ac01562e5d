"""`cf COMMAND --help` shows a default (or "required") for every option of every command."""

from __future__ import annotations

import re

import pytest
from cli_runner import run_cf

COMMANDS = ["", "models", "make-shapes", "shard-dataset", "train", "eval", "predict", "export",
            "benchmark", "quickstart"]  # fmt: skip


def option_blocks(text: str) -> dict[str, str]:
    """The help text of each option of a rich help screen, by its first flag name."""
    blocks: dict[str, str] = {}
    current = None
    for line in text.splitlines():
        row = line.strip().strip("│").strip()
        match = re.match(r"^(\*\s+)?(--[\w-]+)", row)
        if match:
            current = match.group(2)
            blocks[current] = row
        elif current is not None and line.strip().startswith("│"):
            blocks[current] += " " + row
        else:
            current = None
    return blocks


@pytest.mark.parametrize("command", COMMANDS)
def test_every_option_shows_its_default(command: str, capsys: pytest.CaptureFixture,
                                        monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    monkeypatch.setenv("COLUMNS", "250")
    code = run_cf([command, "--help"] if command else ["--help"])
    out = capsys.readouterr().out
    assert code == 0
    blocks = option_blocks(out)
    assert len(blocks) >= 2, out
    missing = [flag for flag, text in blocks.items() if flag != "--help"
               and not re.search(r"default|\[required\]", text, re.IGNORECASE)]
    assert not missing, f"cf {command} --help: no default shown for {missing}"
