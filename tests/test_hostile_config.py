"""Hostile settings (issue 21): YAML alias bombs and configs nested thousands deep stop at once
with one line naming the file (exit 2), NaN / infinite float settings are usage errors, and a
batch larger than the data says which flag to change."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cli_runner import run_cf, run_cf_child

from clusterformer.engine.config_files import (
    MAX_CONFIG_DEPTH,
    load_yaml,
    parse_set,
    read_config_file,
    recipe_summaries,
)

# Each alias list names the previous one 9 times: *a8 stands for 9**9 (387 million) values.
# Under optim.lr the old code built the repr of all of them for its "expected float" message.
_BOMB_LEVELS = [f"&a{i} [" + ", ".join([f"*a{i - 1}" if i else "x"] * 9) + "]" for i in range(9)]
BOMB_VALUE = "[" + ", ".join(_BOMB_LEVELS) + ", *a8]"
# The child exits in seconds; this only keeps a regression from hanging the suite.
CHILD_TIMEOUT = 120
DEEP = 100_000


def _one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    return lines[0]


def _train_args(config: Path, tmp_path: Path) -> list[str]:
    return ["train", "--config", str(config), "--data", str(tmp_path / "data"),
            "--out", str(tmp_path / "run")]  # fmt: skip


def test_alias_bomb_config_is_refused_naming_the_file(tmp_path: Path) -> None:
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(f"task: {{name: classification}}\noptim:\n  lr: {BOMB_VALUE}\n")
    result = run_cf_child(_train_args(bomb, tmp_path), timeout=CHILD_TIMEOUT)
    line = _one_error_line(result.stderr)
    assert result.returncode == 2, result.stderr
    assert str(bomb) in line and "alias" in line


def test_alias_bomb_in_set_is_refused_naming_the_key(tmp_path: Path) -> None:
    args = ["train", "--task", "classification", "--data", str(tmp_path / "data"),
            "--out", str(tmp_path / "run"), "--set", f"optim.lr={BOMB_VALUE}"]  # fmt: skip
    result = run_cf_child(args, timeout=CHILD_TIMEOUT)
    line = _one_error_line(result.stderr)
    assert result.returncode == 2, result.stderr
    assert "--set optim.lr" in line and "alias" in line


@pytest.mark.parametrize(("name", "text"), [
    ("flow.yaml", "task: " + "[" * DEEP + "]" * DEEP + "\n"),
    ("block.yaml", "- " * DEEP + "x\n"),
    ("deep.json", '{"task": ' + "[" * DEEP + "]" * DEEP + "}"),
    ("deep.toml", "task = " + "[" * DEEP + "]" * DEEP + "\n"),
    ("table.toml", "task = " + "{a = " * DEEP + "1" + "}" * DEEP + "\n"),
])  # fmt: skip
def test_deeply_nested_config_is_refused_naming_the_file(
    name: str, text: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    path = tmp_path / name
    path.write_text(text)
    assert run_cf(_train_args(path, tmp_path)) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert str(path) in line and "deep" in line and "RecursionError" not in line


@pytest.mark.parametrize("suffix", [".json", ".toml", ".yaml"])
def test_nesting_below_the_recursion_limit_is_still_refused(suffix: str, tmp_path: Path) -> None:
    """Deeper than the limit yet shallow enough for the parser: the loaded value is measured."""
    depth = MAX_CONFIG_DEPTH + 5
    path = tmp_path / f"deep{suffix}"
    text = {".json": '{"a": ' + "[" * depth + "]" * depth + "}",
            ".toml": "a = " + "[" * depth + "]" * depth,
            ".yaml": "a: " + "[" * depth + "]" * depth}[suffix]  # fmt: skip
    path.write_text(text)
    with pytest.raises(ValueError, match=f"^{path}: nested more than {MAX_CONFIG_DEPTH}"):
        read_config_file(path)


def test_recursive_alias_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "loop.yaml"
    path.write_text("optim: {lr: &a [*a]}\n")
    with pytest.raises(ValueError, match=f"^{path}: a YAML alias refers to a value that contains"):
        read_config_file(path)


def test_ordinary_anchors_and_aliases_still_load(tmp_path: Path) -> None:
    path = tmp_path / "shared.yaml"
    path.write_text("task: {name: classification}\n"
                    "base: &opt {lr: 0.002, weight_decay: 0.01}\n"
                    "optim: {<<: *opt, grad_clip: 1.0}\n"
                    "data:\n  augment:\n    scale: &range [0.5, 1.0]\n"
                    "    scale_range: *range\n")  # fmt: skip
    values = read_config_file(path)
    assert values["optim"] == {"lr": 0.002, "weight_decay": 0.01, "grad_clip": 1.0}
    assert values["data"]["augment"] == {"scale": [0.5, 1.0], "scale_range": [0.5, 1.0]}
    assert load_yaml("", "x") is None
    assert json.loads(json.dumps(values)) == values  # plain values, nothing shared oddly
    assert parse_set("data.augment.scale=[0.5, 2]") == ("data.augment.scale", [0.5, 2])
    assert parse_set("task.name=a: [") == ("task.name", "a: [")  # not YAML: kept as text
    assert recipe_summaries()["shapes"].startswith("classification: ")


@pytest.mark.parametrize(("flags", "expected"), [
    (["--lr", "nan"], "optim.lr (--lr) must be a finite number, got nan"),
    (["--lr", "inf"], "optim.lr (--lr) must be a finite number, got inf"),
    (["--set", "optim.lr=nan"], "optim.lr (--lr) must be a finite number, got nan"),
    (["--set", "optim.weight_decay=.inf"], "optim.weight_decay (--weight-decay) must be a finite"),
    (["--set", "schedule.min_lr_ratio=-.inf"], "schedule.min_lr_ratio (--min-lr-ratio) must be"),
    (["--set", "data.augment.scale=[0.5, .nan]"], "data.augment.scale (--scale) must be a finite"),
    (["--label-smoothing", "nan"], "task.label_smoothing (--label-smoothing) must be a finite"),
])  # fmt: skip
def test_non_finite_float_settings_are_usage_errors(
    flags: list[str], expected: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    args = ["train", "--task", "classification", "--data", str(tmp_path / "data"),
            "--out", str(tmp_path / "run"), *flags]  # fmt: skip
    assert run_cf(args) == 2
    assert expected in _one_error_line(capsys.readouterr().err)


def test_batch_larger_than_the_data_names_the_flag(tmp_path: Path) -> None:
    from clusterformer.data import LoaderSpec, build_loader
    from clusterformer.data.shapes import make_shapes

    make_shapes(tmp_path / "shapes", num_images=4, image_size=32, kinds=("classes",))
    data = tmp_path / "shapes" / "classes"
    with pytest.raises(ValueError) as info:
        build_loader(data, "classification", LoaderSpec(batch_size=100_000, image_size=32,
                                                        train=True, rank=0, world_size=1))
    message = str(info.value)
    assert message.startswith(f"{data}: 4 samples are fewer than")
    assert "1 x 100000" in message and "--batch-size" in message
    assert "drop_last" not in message
