"""A task defined only in the tests (tests/plugins/foreground_task.py, binary foreground
segmentation) trains, evaluates, predicts and exports through the normal ``cf`` commands: a new
task is one module, loaded as a plugin with ``CLUSTERFORMER_PLUGINS``, with no library file
touched."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from cli_runner import run_cf
from PIL import Image

from clusterformer.data import make_shapes, open_source, write_shards

PLUGINS = Path(__file__).parent / "plugins"


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("plugin")
    made = make_shapes(root / "raw", num_images=12, image_size=48, seed=0, kinds=("scenes",))
    out = root / "shards"
    write_shards(open_source("ade20k", made["images"], made["classes_json"],
                             made["semantic_masks"]), out, samples_per_shard=6)  # fmt: skip
    return {"shards": out, "images": sorted(Path(made["images"]).glob("*.jpg"))[:2]}


@pytest.fixture()
def plugin(monkeypatch: pytest.MonkeyPatch) -> None:
    """This process loads the plugin as a fresh ``cf`` would: from the environment variable."""
    monkeypatch.setenv("CLUSTERFORMER_PLUGINS", "foreground_task")
    monkeypatch.syspath_prepend(str(PLUGINS))


def test_plugin_task_trains_evaluates_predicts_and_exports(
    shards: dict, tmp_path: Path, plugin: None, capsys: pytest.CaptureFixture
) -> None:
    run = tmp_path / "run"
    # Training in a fresh process: the task exists only through CLUSTERFORMER_PLUGINS.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CLUSTERFORMER_PLUGINS": "foreground_task",
           "PYTHONPATH": os.pathsep.join([str(PLUGINS), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(
        [sys.executable, "-m", "clusterformer.cli", "train", "--task", "foreground", "--data",
         str(shards["shards"]), "--val-data", str(shards["shards"]), "--out", str(run),
         "--steps", "4", "--batch-size", "4", "--image-size", "48", "--lr", "3e-3",
         "--fg-pos-weight", "4", "--log-every", "1"],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in records if r["split"] == "val"][-1]
    assert 0.0 < val["fg_IoU"] <= 100.0 and val["num_images"] == 12
    config = json.loads((run / "config.json").read_text())
    assert config["task"] == {"name": "foreground", "fg_threshold": 0.5, "fg_pos_weight": 4.0}

    out = tmp_path / "m.json"
    assert run_cf(["eval", "--ckpt", str(run), "--data", str(shards["shards"]), "--out", str(out)]) == 0
    assert json.loads(out.read_text())["fg_IoU"] == pytest.approx(val["fg_IoU"])
    assert (run / "checkpoints" / "best.safetensors").is_file()  # by its primary metric, fg_IoU
    capsys.readouterr()
    assert run_cf(["eval", "--ckpt", str(run), "--data", str(shards["shards"]), "--per-class"]) == 2
    assert "--per-class: the foreground task reports no per-class metrics" in capsys.readouterr().err

    pred = tmp_path / "pred"
    assert run_cf(["predict", "--ckpt", str(run), *map(str, shards["images"]), "--out", str(pred),
                   "--max-detections", "3"]) == 0  # fmt: skip
    everything = json.loads((pred / "predictions.json").read_text())
    assert [r["task"] for r in everything] == ["foreground"] * 2
    for path, record in zip(shards["images"], everything, strict=True):
        assert all(s["label"] == "foreground" for s in record["segments"])
        assert Image.open(pred / f"{path.stem}.png").size == (288, 288)  # 48 px drawn 6x

    exported = tmp_path / "fg.pt2"
    code = run_cf(["export", "--ckpt", str(run), "--format", "pt2", "--out", str(exported),
                   "--with-postprocess", "--image-size", "48"])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    from clusterformer.export import read_export_metadata

    meta = read_export_metadata(exported)
    assert meta["task"] == "foreground" and meta["outputs"] == ["fg_prob"]
    assert [c["name"] for c in meta["categories"]] == ["foreground"]


def test_plugin_options_are_flags_and_settings(plugin: None, capsys: pytest.CaptureFixture) -> None:
    from clusterformer.engine.config_files import resolve_config
    from clusterformer.tasks import task_names

    assert "foreground" in task_names()
    assert run_cf(["train", "--help-all"]) == 0
    assert "--fg-pos-weight" in capsys.readouterr().out
    cfg = resolve_config(task="foreground", fg_threshold=0.7, sets=["task.fg_pos_weight=2"])
    assert cfg.task.options.fg_threshold == 0.7 and cfg.task.options.fg_pos_weight == 2.0
    with pytest.raises(ValueError, match="fg_threshold: not an option of the panoptic task"):
        resolve_config("shapes-panoptic", fg_threshold=0.7)


def test_a_plugin_that_fails_to_import_is_named(monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture) -> None:  # fmt: skip
    monkeypatch.setenv("CLUSTERFORMER_PLUGINS", "no_such_task_module")
    assert run_cf(["train", "--task", "nothing", "--print-config"]) == 1  # not a usage error
    err = capsys.readouterr().err
    assert "no_such_task_module" in err and "CLUSTERFORMER_PLUGINS" in err and err.count("\n") == 1
