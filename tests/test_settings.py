"""Settings that mean what they say (issue 24, points 1-3): one lr rule for files, flags and
--set; a clamped schedule value is warned about; --print-config and RUN/config.yaml hold
resolved values and no per-command switches; `cf train --out RUN --resume` needs nothing
but the run."""

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


def test_printed_config_holds_resolved_values(capsys: pytest.CaptureFixture) -> None:
    """Point 2: the values the model is built with, not null; no resume / restart keys."""
    printed = yaml.safe_load(_print_config(["--task", "detection", "--resume"], capsys))
    decoder, backbone = printed["model"]["decoder"], printed["model"]["backbone"]
    assert decoder["num_queries"] == 100 and decoder["layers"] == 6
    assert decoder["hidden_dim"] == 64 and decoder["heads"] == 4  # nano's sizes
    assert backbone["depths"] == [1, 1, 2, 1] and backbone["dims"] == [32, 64, 128, 256]
    assert backbone["window_size"] == 7
    assert "resume" not in printed["runtime"] and "restart" not in printed["runtime"]
    tiny = yaml.safe_load(_print_config(["--task", "detection", "--model", "clusterformer-tiny",
                                         "--set", "model.decoder.layers=3"], capsys))  # fmt: skip
    assert tiny["model"]["backbone"]["depths"] == [2, 2, 6, 2]
    assert tiny["model"]["decoder"]["hidden_dim"] == 256 and tiny["model"]["decoder"]["layers"] == 3


def test_another_model_beside_a_printed_config_builds_that_model(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:  # fmt: skip
    """A printed nano config spells out nano's sizes; --model tiny beside it must not keep
    them, while a value the file changed stays."""
    printed = yaml.safe_load(_print_config(["--task", "detection",
                                            "--set", "model.decoder.num_queries=7"], capsys))
    path = tmp_path / "nano.yaml"
    path.write_text(yaml.safe_dump(printed))
    tiny = yaml.safe_load(_print_config(["--config", str(path), "--model", "clusterformer-tiny"],
                                        capsys))  # fmt: skip
    assert tiny["model"]["backbone"]["dims"] == [96, 192, 384, 768]
    assert tiny["model"]["decoder"]["hidden_dim"] == 256
    assert tiny["model"]["decoder"]["num_queries"] == 7
    classifier = yaml.safe_load(_print_config(["--task", "classification"], capsys))
    assert classifier["model"]["decoder"]["layers"] is None  # a classifier has no decoder


def test_resume_needs_only_the_run(shards: Path, tmp_path: Path,
                                   capsys: pytest.CaptureFixture) -> None:  # fmt: skip
    """Point 3 (and 2's piped resume): `cf train --out RUN --resume --steps N` continues RUN
    with RUN's own settings; a changed task setting is still refused; the run's recorded
    settings are the same after a piped resume (progress included)."""
    run = tmp_path / "run"
    assert run_cf(train_argv(shards, run, 1, "--lr-base-batch", "8", "--mixup", "0.2")) == 0
    first = yaml.safe_load((run / "config.yaml").read_text())
    assert first["runtime"]["progress"] is True  # not recorded from this test's piped stderr
    capsys.readouterr()
    assert run_cf(["train", "--out", str(run), "--resume", "--steps", "2"]) == 0
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["split"] == "train"] == [1, 2]
    after = yaml.safe_load((run / "config.yaml").read_text())
    assert after["schedule"].pop("steps") == 2 and first["schedule"].pop("steps") == 1
    assert after == first
    assert _facts(run)["resumed_from_step"] == 1
    assert f"cf: --resume: settings from {run / 'config.yaml'}" in capsys.readouterr().out
    assert run_cf(["train", "--out", str(run), "--resume", "--image-size", "48"]) == 1
    err = capsys.readouterr().err
    assert "trained with --image-size 32, now 48; resume with the same setting" in err
    assert run_cf(["train", "--out", str(run), "--resume", "--model", "clusterformer-tiny"]) == 1
    assert "trained with --model clusterformer-nano, now clusterformer-tiny" in capsys.readouterr().err
    empty = tmp_path / "empty"
    assert run_cf(["train", "--out", str(empty), "--resume"]) == 2  # nothing to take settings from
    assert "task.name: no task given" in capsys.readouterr().err
