"""`cf COMMAND --help` shows a default (or "required") for every option of every command, and
reads at 80 columns."""

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


def _help(args: list[str], columns: int, capsys: pytest.CaptureFixture,
          monkeypatch: pytest.MonkeyPatch) -> str:  # fmt: skip
    monkeypatch.setenv("COLUMNS", str(columns))
    assert run_cf(args) == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("command", [*COMMANDS, "plot"])
def test_help_reads_at_80_columns(command: str, capsys: pytest.CaptureFixture,
                                  monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """Issue 24 point 4: rich's table cut flags and words at 80 columns
    (`--dispatch-mlp-rat…`, `CF_MAX_IMAGE_PIX…`); `cf train --help` was ~700 lines."""
    out = _help([command, "--help"] if command else ["--help"], 80, capsys, monkeypatch)
    assert "…" not in out
    too_wide = [line for line in out.splitlines() if len(line) > 80]
    assert not too_wide, too_wide
    flat = " ".join(out.split())
    # no "default unset" beside a default the help text states
    for block in re.split(r"\s(?=--[\w-]+\s)", flat):
        if re.search(r"default:? \(?unset\)?", block):
            assert len(re.findall(r"\bdefault\b", block)) == 1, block
    if command == "train":
        assert len(out.splitlines()) < 120
        for flag in ("--task", "--data", "--out", "--val-data", "--model", "--steps", "--epochs",
                     "--batch-size", "--lr", "--image-size", "--compile", "--amp", "--resume",
                     "--seed", "--save-every", "--eval-every", "--recipe", "--config", "--set",
                     "--print-config", "--help-all"):
            assert re.search(rf"(^|\s){flag}(\s|$)", out, re.M), flag


def test_train_help_all_lists_every_setting_at_80_columns(
        capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    from clusterformer.engine.config import leaves
    from clusterformer.engine.config_flags import config_flags

    out = _help(["train", "--help-all"], 80, capsys, monkeypatch)
    assert max(len(line) for line in out.splitlines()) <= 80
    words = set(out.replace(",", " ").split())
    for path, _, _ in leaves():
        assert ".".join(path) in words, path
    for flag in config_flags():
        assert flag.flag in words, flag.flag
    assert "default unset" not in " ".join(out[out.index("runtime.amp"):].split()[:30])
