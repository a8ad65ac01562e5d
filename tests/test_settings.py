"""Settings that mean what they say (issue 24): one lr rule for files, flags and --set; a
clamped schedule value is warned about."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from cli_runner import run_cf, train_argv


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from clusterformer.data import make_shapes, open_source, write_shards

    root = tmp_path_factory.mktemp("settings")
    made = make_shapes(root / "raw", num_images=8, image_size=32, seed=0)
    write_shards(open_source("imagefolder", Path(made["classes"])), root / "cls")
    return root / "cls"


def _print_config(args: list[str], capsys: pytest.CaptureFixture) -> str:
    assert run_cf(["train", *args, "--print-config"]) == 0
    return capsys.readouterr().out


def _facts(run: Path) -> dict:
    return json.loads((run / "config.json").read_text())["run"]


def test_lr_means_the_same_in_a_file_a_flag_and_set(shards: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture) -> None:  # fmt: skip
    """The issue's point 1: an lr edited in a printed config, --lr and --set optim.lr are all
    the rate for lr_base_batch (the old code scaled only the file's). Batch 4, base 16."""
    base = train_argv(shards, tmp_path / "unused", 1, "--set", "optim.lr_base_batch=16")[1:]
    printed = tmp_path / "printed.yaml"
    printed.write_text(_print_config(base, capsys))
    edited = yaml.safe_load(printed.read_text())
    edited["optim"]["lr"] = 3e-4
    (tmp_path / "edited.yaml").write_text(yaml.safe_dump(edited))
    runs = {"file": ["--config", str(tmp_path / "edited.yaml")],
            "flag": ["--config", str(printed), "--lr", "3e-4"],
            "set": ["--config", str(printed), "--set", "optim.lr=3e-4"]}
    for name, args in runs.items():
        assert run_cf(["train", *args, "--out", str(tmp_path / name)]) == 0, name
        err = capsys.readouterr().err
        assert "lr 7.5e-05 (optim.lr 0.0003 for a global batch of 16, x 4/16)" in err, (name, err)
        facts = _facts(tmp_path / name)
        assert facts["lr_effective"] == pytest.approx(7.5e-5), name
    # the run's own config fed back trains with the same effective lr
    again = tmp_path / "again"
    assert run_cf(["train", "--config", str(tmp_path / "flag" / "config.yaml"),
                   "--out", str(again)]) == 0  # fmt: skip
    assert _facts(again)["lr_effective"] == pytest.approx(7.5e-5)
    # no base batch: used as is, and the plan line says so
    assert run_cf(train_argv(shards, tmp_path / "plain", 1)) == 0
    assert "lr 0.001 (optim.lr 0.001 as given" in capsys.readouterr().err


def test_a_clamped_warmup_is_warned_about(shards: Path, tmp_path: Path,
                                          capsys: pytest.CaptureFixture) -> None:  # fmt: skip
    """`warmup_steps: 1000` in a 3-step run used to become 2 in silence."""
    assert run_cf(train_argv(shards, tmp_path / "run", 3, "--warmup-steps", "1000")) == 0
    err = capsys.readouterr().err
    assert ("warning: schedule.warmup_steps asks for 1000 warm-up steps in a run of 3 steps; "
            "clamped to 2") in err  # fmt: skip
    assert _facts(tmp_path / "run")["warmup_steps"] == 2
    assert run_cf(train_argv(shards, tmp_path / "fits", 3, "--warmup-steps", "2")) == 0
    assert "warning" not in capsys.readouterr().err
