"""Detection through the engine and the CLI: a 2-step training run, `cf predict` on its
checkpoint, `cf eval --ckpt` on the shards."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cli_runner import run_cf as _cf
from PIL import Image

from clusterformer.data import make_shapes, open_source, write_shards
from clusterformer.engine.config_files import resolve_config
from clusterformer.engine.loop import train


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("detcli")
    made = make_shapes(root / "shapes", num_images=4, image_size=64, seed=0)
    shards = root / "shards"
    write_shards(open_source("coco", made["images"], made["instances"]), shards, samples_per_shard=4)
    cfg = resolve_config(task="detection", data=str(shards), out=str(root / "run"),
                         model="clusterformer-nano", steps=2, batch_size=2, image_size=48,
                         lr=1e-3, device="cpu", log_every=1)
    result = train(cfg, handle_signals=False)
    images = sorted(Path(made["images"]).glob("*.jpg"))[:2]
    return {"root": root, "run": result.run_dir, "shards": shards, "images": images,
            "instances": made["instances"]}




def test_training_logs_detection_losses(run: dict) -> None:
    lines = (run["run"] / "metrics.jsonl").read_text().splitlines()
    first = json.loads(lines[0])
    assert {"loss", "loss_class", "loss_l1", "loss_giou"} <= set(first)
    config = json.loads((run["run"] / "config.json").read_text())
    assert config["task"]["name"] == "detection"


def test_cf_predict_draws_boxes_and_writes_json(run: dict, tmp_path: Path) -> None:
    out = tmp_path / "pred"
    code = _cf(["predict", "--ckpt", str(run["run"]), *map(str, run["images"]), "--out", str(out),
                "--score-threshold", "0.0", "--max-detections", "5"])
    assert code == 0
    everything = json.loads((out / "predictions.json").read_text())
    assert len(everything) == 2
    for path, record in zip(run["images"], everything, strict=True):
        overlay = Image.open(out / f"{path.stem}.png")
        assert overlay.size == (256, 256) and overlay.format == "PNG"  # 64 px drawn 4x
        assert record == json.loads((out / f"{path.stem}.json").read_text())
        dets = record["detections"]
        assert len(dets) == 5
        assert {d["label"] for d in dets} <= {"circle", "rectangle", "triangle", "ellipse"}
        for det in dets:
            x0, y0, x1, y1 = det["box_xyxy"]
            assert 0 <= x0 <= x1 <= 64 and 0 <= y0 <= y1 <= 64 and 0 <= det["score"] <= 1
        # the overlay differs from the input where boxes were drawn
        enlarged = Image.open(path).convert("RGB").resize((256, 256), Image.NEAREST)
        assert overlay.convert("RGB").tobytes() != enlarged.tobytes()


def test_cf_predict_errors_are_one_line(run: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code = _cf(["predict", "--ckpt", str(run["run"]), str(tmp_path / "missing.jpg"), "--out", str(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and len(err) == 1 and "missing.jpg" in err[0]
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image")
    code = _cf(["predict", "--ckpt", str(run["run"]), str(broken), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and len(err) == 1 and "broken.jpg" in err[0]


def test_cf_eval_checkpoint_gives_box_ap_keys(run: dict, tmp_path: Path) -> None:
    out = tmp_path / "metrics.json"
    code = _cf(["eval", "--ckpt", str(run["run"]), "--data", str(run["shards"]), "--out", str(out),
                "--batch-size", "3"])
    assert code == 0
    metrics = json.loads(out.read_text())
    for key in ("bbox_AP", "bbox_AP50", "bbox_AP75"):
        assert 0.0 <= metrics[key] <= 100.0


def test_cf_eval_writes_detections_that_rescore_to_the_same_ap(run: dict, tmp_path: Path) -> None:
    out = tmp_path / "metrics.json"
    assert _cf(["eval", "--ckpt", str(run["run"]), "--data", str(run["shards"]), "--out", str(out)]) == 0
    detections = tmp_path / "metrics.detections.json"
    assert detections.is_file()
    rescored = tmp_path / "rescored.json"
    assert _cf(["eval", "--task", "detection", "--predictions", str(detections),
                "--data", str(run["shards"]), "--out", str(rescored)]) == 0
    first, second = json.loads(out.read_text()), json.loads(rescored.read_text())
    for key in ("bbox_AP", "bbox_AP50", "bbox_AP75"):
        assert second[key] == pytest.approx(first[key], abs=1e-9)


def test_cf_eval_ground_truth_as_predictions_gives_ap_100(run: dict, tmp_path: Path) -> None:
    out = tmp_path / "gt.json"
    assert _cf(["eval", "--task", "detection", "--predictions", str(run["instances"]),
                "--data", str(run["shards"]), "--out", str(out)]) == 0
    metrics = json.loads(out.read_text())
    assert metrics["bbox_AP"] == pytest.approx(100.0)
    assert metrics["bbox_AP50"] == pytest.approx(100.0)


def test_cf_train_detection_through_the_cli(run: dict, tmp_path: Path) -> None:
    out = tmp_path / "run"
    code = _cf(["train", "--task", "detection", "--data", str(run["shards"]), "--out", str(out),
                "--steps", "1", "--batch-size", "2", "--image-size", "48"])
    assert code == 0
    assert (out / "checkpoints" / "last.safetensors").is_file()
    config = json.loads((out / "config.json").read_text())
    assert config["task"]["name"] == "detection"


def test_small_images_are_drawn_larger() -> None:
    from clusterformer.tasks.predictions import overlay_scale

    assert [overlay_scale(64, 64), overlay_scale(100, 30), overlay_scale(200, 300), overlay_scale(1, 1)] == [4, 3, 1, 256]
