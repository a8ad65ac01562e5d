"""Segmentation through the engine and the CLI: 2-step training per task, `cf predict` masks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from clusterformer.cli.app import main
from clusterformer.data import make_shapes, open_source, write_shards
from PIL import Image

from clusterformer.engine.config import resolve_config
from clusterformer.engine.loop import train

TASKS = ("instance", "semantic", "panoptic")
SMALL = {"hidden_dim": 32, "decoder_heads": 2, "decoder_ffn_dim": 64, "num_queries": 10,
         "decoder_layers": 3}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("segcli")
    made = make_shapes(root / "shapes", num_images=4, image_size=64, seed=0)
    sources = {
        "instance": open_source("coco", made["images"], made["instances"]),
        "panoptic": open_source("coco-panoptic", made["images"], made["panoptic_json"], made["panoptic_masks"]),
        "semantic": open_source("ade20k", made["images"], made["classes_json"], made["semantic_masks"]),
    }
    out = {"images": sorted(Path(made["images"]).glob("*.jpg"))[:2], "root": root}
    for task, source in sources.items():
        shards = root / f"shards-{task}"
        write_shards(source, shards, samples_per_shard=4)
        cfg = resolve_config(None, task=task, data=str(shards), out=str(root / f"run-{task}"),
                             model="clusterformer-nano", model_overrides=SMALL, steps=2, batch_size=2,
                             image_size=48, lr=1e-3, device="cpu", log_every=1)
        out[task] = {"run": train(cfg, handle_signals=False).run_dir, "shards": shards}
    return out


def _cf(args: list[str]) -> int:
    try:
        main(args)
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


@pytest.mark.parametrize("task", TASKS)
def test_training_logs_mask_losses(runs: dict, task: str) -> None:
    first = json.loads((runs[task]["run"] / "metrics.jsonl").read_text().splitlines()[0])
    assert {"loss", "loss_class", "loss_mask", "loss_dice"} <= set(first)
    assert json.loads((runs[task]["run"] / "config.json").read_text())["task"] == task


@pytest.mark.parametrize("task", TASKS)
def test_cf_predict_draws_masks_and_writes_json(runs: dict, task: str, tmp_path: Path) -> None:
    out = tmp_path / "pred"
    code = _cf(["predict", "--ckpt", str(runs[task]["run"]), *map(str, runs["images"]), "--out", str(out),
                "--score-threshold", "0.0", "--max-detections", "5"])
    assert code == 0
    everything = json.loads((out / "predictions.json").read_text())
    assert len(everything) == 2
    for path, record in zip(runs["images"], everything, strict=True):
        overlay = Image.open(out / f"{path.stem}.png")
        assert overlay.size == (64, 64) and overlay.format == "PNG"
        assert record == json.loads((out / f"{path.stem}.json").read_text())
        assert record["task"] == task
        segments = record["segments"]
        if task == "semantic":  # a 2-step model's instance masks / panoptic scores may keep none
            assert segments
        for seg in segments:
            assert {"label", "category_id", "train_id", "area", "box_xyxy", "rle", "color"} <= set(seg)
            assert seg["rle"]["size"] == [64, 64]
        if task == "instance":
            assert len(segments) <= 5


def test_cf_train_segmentation_through_the_cli(runs: dict, tmp_path: Path) -> None:
    code = _cf(["train", "--task", "semantic", "--data", str(runs["semantic"]["shards"]),
                "--out", str(tmp_path / "run"), "--steps", "1", "--batch-size", "2",
                "--image-size", "48", "--device", "cpu"])
    assert code == 0
    assert (tmp_path / "run" / "checkpoints" / "last.safetensors").exists()
