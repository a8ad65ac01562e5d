"""The training config: --print-config, --set merging, flags and help derived from the fields,
config files in and out, and RUN/config.yaml repeating a run exactly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from cli_runner import run_cf

from clusterformer.engine.config import leaves
from clusterformer.engine.config_files import read_recipe, recipe_names, resolve_config


def _printed(args: list[str], capsys: pytest.CaptureFixture) -> dict:
    assert run_cf(["train", *args, "--print-config"]) == 0
    return yaml.safe_load(capsys.readouterr().out)


def test_set_changes_one_decoder_key_of_the_recipe(capsys: pytest.CaptureFixture) -> None:
    """The issue's acceptance: the recipe's other decoder keys stay as they were."""
    printed = _printed(["--recipe", "coco-panoptic", "--set", "model.decoder.num_queries=50"], capsys)
    recipe = read_recipe("coco-panoptic")["model"]["decoder"]
    decoder = printed["model"]["decoder"]
    assert decoder["num_queries"] == 50 and recipe["num_queries"] == 100
    assert {k: decoder[k] for k in recipe if k != "num_queries"} == {
        k: v for k, v in recipe.items() if k != "num_queries"}
    assert printed["task"]["name"] == "panoptic" and printed["model"]["name"] == "clusterformer-small"


def test_a_flag_never_wipes_the_recipes_model_settings(capsys: pytest.CaptureFixture) -> None:
    """--head-pool used to replace shapes-panoptic's whole model_overrides dict."""
    printed = _printed(["--recipe", "shapes-panoptic", "--head-pool", "concat"], capsys)
    assert printed["model"]["backbone"]["head_pool"] == "concat"
    assert printed["model"]["decoder"]["num_queries"] == 20
    assert printed["model"]["decoder"]["query_init"] == "free"
    assert printed["task"]["num_points"] == 1024 and printed["task"]["class_weight"] == 5.0


def test_every_recipe_is_a_file_naming_its_task() -> None:
    assert set(recipe_names()) == {"imagenet-1k", "coco-detection", "coco-instance",
                                   "coco-panoptic", "ade20k-semantic", "shapes", "shapes-panoptic"}
    for name in recipe_names():
        cfg = resolve_config(name)
        assert cfg.task.name == read_recipe(name)["task"]["name"] and cfg.recipe == name


def test_help_lists_every_setting_and_recipe(capsys: pytest.CaptureFixture,
                                            monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """--help: the everyday flags and the recipes; --help-all: every setting and its flag."""
    monkeypatch.setenv("COLUMNS", "300")
    assert run_cf(["train", "--help"]) == 0
    text = capsys.readouterr().out
    for flag in ("--task", "--data", "--out", "--val-data", "--model", "--steps", "--epochs",
                 "--batch-size", "--lr", "--image-size", "--compile", "--amp", "--resume",
                 "--restart", "--seed", "--save-every", "--eval-every", "--recipe", "--config",
                 "--set", "--print-config", "--help-all"):
        assert flag in text, flag
    for name in recipe_names():
        assert name in text
    assert run_cf(["train", "--help-all"]) == 0
    text = capsys.readouterr().out
    for path, _, _ in leaves():
        assert ".".join(path) in text, path
    for key in ("task.name", "task.num_points", "task.label_smoothing", "task.top_k"):
        assert key in text
    for flag in ("--head-pool", "--mixup", "--cutmix", "--rand-augment", "--backbone-weights",
                 "--decoder-layers", "--num-queries"):
        assert flag in text, flag


def test_config_files_in_every_format(tmp_path: Path) -> None:
    toml = tmp_path / "c.toml"
    toml.write_text('[task]\nname = "detection"\ntop_k = 50\n[model.decoder]\nnum_queries = 30\n')
    cfg = resolve_config(config=toml, steps=5)
    assert cfg.task.options.top_k == 50 and cfg.model.decoder.num_queries == 30
    assert cfg.schedule.steps == 5
    as_json = tmp_path / "c.json"
    as_json.write_text(json.dumps({**cfg.to_dict(), "run": {"total_steps": 5}}))
    assert resolve_config(config=as_json).to_dict() == cfg.to_dict()
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [1, 2\n")
    with pytest.raises(ValueError, match="bad.yaml: not valid YAML"):
        resolve_config(config=bad)
    with pytest.raises(ValueError, match="not both"):
        resolve_config("shapes", config=toml)


def _records(run: Path) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(x).items() if k != "img_per_s"} for x in lines]


@pytest.mark.parametrize("args", [
    ["--recipe", "shapes", "--mixup", "0.4", "--head-pool", "concat", "--data", "{cls}"],
    ["--recipe", "shapes-panoptic", "--set", "model.decoder.num_queries=6",
     "--set", "task.num_points=64", "--data", "{pan}"],
], ids=["classification", "panoptic"])
def test_config_yaml_repeats_the_run_exactly(args: list[str], tiny_shards: dict[str, Path],
                                              tmp_path: Path) -> None:  # fmt: skip
    args = [a.format(**{k: str(v) for k, v in tiny_shards.items()}) for a in args]
    first, again = tmp_path / "first", tmp_path / "again"
    common = ["--steps", "3", "--batch-size", "4", "--image-size", "32", "--log-every", "1",
              "--eval-every", "2", "--seed", "7"]
    data = args[args.index("--data") + 1]
    assert run_cf(["train", *args, *common, "--val-data", data, "--out", str(first)]) == 0
    assert run_cf(["train", "--config", str(first / "config.yaml"), "--out", str(again)]) == 0
    assert _records(again) == _records(first)
    assert [r["step"] for r in _records(first) if r["split"] == "val"] == [2, 3]
    settings = [yaml.safe_load((run / "config.yaml").read_text()) for run in (first, again)]
    assert settings[1]["runtime"].pop("out") == str(again)
    assert settings[0]["runtime"].pop("out") == str(first)
    assert settings[1] == settings[0]  # the same settings, only the run folder differs


@pytest.fixture(scope="module")
def tiny_shards(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from clusterformer.data import make_shapes, open_source, write_shards

    root = tmp_path_factory.mktemp("config")
    made = make_shapes(root / "raw", num_images=8, image_size=32, seed=0)
    write_shards(open_source("imagefolder", Path(made["classes"])), root / "cls")
    write_shards(open_source("coco-panoptic", made["images"], made["panoptic_json"],
                             made["panoptic_masks"]), root / "pan")  # fmt: skip
    return {"cls": root / "cls", "pan": root / "pan"}
