"""Segmentation through the engine and the CLI: 2-step training per task (with --val-data),
`cf eval --ckpt` (keys, batch-size invariance, written predictions re-scored with
`cf eval --predictions`), `cf predict` masks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from cli_runner import run_cf as _cf
from PIL import Image

from clusterformer.data import make_shapes, open_source, write_shards
from clusterformer.engine.config_files import resolve_config
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
        # Panoptic keeps every center (threshold 0, saved in the checkpoint's task config) so a
        # 2-step model still writes segments for the eval tests below to compare.
        threshold = ["task.object_threshold=0.0"] if task == "panoptic" else []
        cfg = resolve_config(task=task, data=str(shards), out=str(root / f"run-{task}"),
                             model="clusterformer-nano", steps=2, batch_size=2, image_size=48,
                             lr=1e-3, device="cpu", log_every=1, val_data=str(shards),
                             sets=threshold, **SMALL)
        out[task] = {"run": train(cfg, handle_signals=False).run_dir, "shards": shards}
    return out


KEYS = {
    "instance": {"segm_AP", "segm_AP50", "segm_AP75", "bbox_AP", "bbox_AP50", "bbox_AP75"},
    "semantic": {"mIoU", "aAcc"},
    "panoptic": {"PQ", "SQ", "RQ", "PQ_th", "PQ_st"},
}
# What `cf eval --ckpt ... --out NAME.json` writes beside the metrics (re-scorable as is).
WRITTEN = {"instance": "m.segm.json", "semantic": "m.semantic", "panoptic": "m.panoptic.json"}




@pytest.mark.parametrize("task", TASKS)
def test_training_logs_mask_losses(runs: dict, task: str) -> None:
    first = json.loads((runs[task]["run"] / "metrics.jsonl").read_text().splitlines()[0])
    assert {"loss", "loss_class", "loss_mask", "loss_dice"} <= set(first)
    assert json.loads((runs[task]["run"] / "config.json").read_text())["task"]["name"] == task


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
        assert overlay.size == (256, 256) and overlay.format == "PNG"  # 64 px drawn 4x
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


@pytest.mark.parametrize("task", TASKS)
def test_val_data_logs_the_task_metrics(runs: dict, task: str) -> None:
    lines = [json.loads(line) for line in (runs[task]["run"] / "metrics.jsonl").read_text().splitlines()]
    val = [line for line in lines if line.get("split") == "val"]
    assert val and val[-1]["step"] == 2
    assert KEYS[task] <= set(val[-1])


@pytest.fixture(scope="module")
def evals(runs: dict, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Per task: `cf eval --ckpt` at batch size 4 (--out, writes predictions) and at 1, both at
    the source size 64 so the evaluator's ground truth is the dataset's own, pixel for pixel."""
    out: dict = {}
    for task in TASKS:
        folder = tmp_path_factory.mktemp(f"eval-{task}")
        metrics = {}
        for batch_size in (4, 1):
            path = folder / f"b{batch_size}" / "m.json"
            path.parent.mkdir()
            code = _cf(["eval", "--ckpt", str(runs[task]["run"]), "--data", str(runs[task]["shards"]),
                        "--out", str(path), "--batch-size", str(batch_size), "--image-size", "64",
                        "--device", "cpu"])
            assert code == 0
            metrics[batch_size] = json.loads(path.read_text())
        out[task] = {"metrics": metrics, "folder": folder / "b4"}
    return out


@pytest.mark.parametrize("task", TASKS)
def test_cf_eval_ckpt_writes_the_task_keys(evals: dict, task: str) -> None:
    metrics = evals[task]["metrics"][4]
    assert KEYS[task] <= set(metrics)
    assert metrics["num_images"] == 4 and metrics["image_size"] == 64 and metrics["step"] == 2
    for key in KEYS[task]:
        assert -1.0 <= metrics[key] <= 100.0


@pytest.mark.parametrize("task", TASKS)
def test_cf_eval_metrics_are_identical_at_batch_size_1_and_4(evals: dict, task: str) -> None:
    assert evals[task]["metrics"][1] == evals[task]["metrics"][4]
    # The predictions themselves agree too (a 2-step model scores ~0, so this is the real check).
    b4, b1 = evals[task]["folder"], evals[task]["folder"].parent / "b1"
    if task == "instance":
        first, second = (json.loads((b / WRITTEN[task]).read_text()) for b in (b4, b1))
        assert len(first) == len(second) > 0
        key = ("image_id", "category_id")
        assert [tuple(r[k] for k in key) + (r["segmentation"]["counts"],) for r in first] == [
            tuple(r[k] for k in key) + (r["segmentation"]["counts"],) for r in second]
        assert [r["score"] for r in first] == pytest.approx([r["score"] for r in second], abs=1e-6)
    else:
        folder = "m.panoptic" if task == "panoptic" else WRITTEN[task]
        pngs = sorted((b4 / folder).glob("*.png"))
        assert len(pngs) == 4
        for png in pngs:
            assert np.array_equal(np.asarray(Image.open(png)), np.asarray(Image.open(b1 / folder / png.name)))
        if task == "panoptic":
            segments = [a["segments_info"] for a in json.loads((b4 / WRITTEN[task]).read_text())["annotations"]]
            assert any(segments)
            assert segments == [a["segments_info"] for a in json.loads((b1 / WRITTEN[task]).read_text())["annotations"]]


@pytest.mark.parametrize("task", TASKS)
def test_written_predictions_rescore_to_the_same_metrics(
    runs: dict, evals: dict, task: str, tmp_path: Path
) -> None:
    folder = evals[task]["folder"]
    written = folder / WRITTEN[task]
    assert written.exists()
    if task == "panoptic":  # panopticapi's convention: the PNG folder is the JSON minus .json
        assert len(list((folder / "m.panoptic").glob("*.png"))) == 4
    if task == "semantic":
        assert len(list(written.glob("*.png"))) == 4
    out = tmp_path / "rescored.json"
    code = _cf(["eval", "--task", task, "--predictions", str(written),
                "--data", str(runs[task]["shards"]), "--out", str(out)])
    assert code == 0
    rescored = json.loads(out.read_text())
    metrics = evals[task]["metrics"][4]
    for key in KEYS[task] | {"num_images"}:
        assert rescored[key] == metrics[key], key
