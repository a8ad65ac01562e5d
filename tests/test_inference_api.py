"""The Python API (`clusterformer.load` -> Predictor): for every task its records are `cf
predict`'s records and its drawings `cf predict`'s overlays, on synthetic images and (marker
`shared_data`) real photos; paths, PIL images, arrays and tensors give one prediction; batched
equals one by one; `features()` shapes; bad inputs and settings named; NaN outputs stopped."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_runner import run_cf
from PIL import Image

import clusterformer
from clusterformer.inference import (
    ClassificationPrediction,
    DetectionPrediction,
    InstancePrediction,
    PanopticPrediction,
    SemanticPrediction,
    SettingError,
)

TASKS = ("classification", "detection", "instance", "semantic", "panoptic")
TYPES = {"classification": ClassificationPrediction, "detection": DetectionPrediction,
         "instance": InstancePrediction, "semantic": SemanticPrediction,
         "panoptic": PanopticPrediction}  # fmt: skip
SHARED = Path(__file__).resolve().parents[2] / "shared" / "datasets"
# Real photos of several sizes and aspect ratios, from two COCO subsets and ADE20K.
PHOTOS = ("coco_instances/coco128_train2017/images/000000000009.jpg",
          "coco_instances/coco128_train2017/images/000000000025.jpg",
          "coco_panoptic/coco_val2017_100/images/000000000139.jpg",
          "ade_semantic/ade20k_sceneparsing_sample/images/ADE_val_00000001.jpg")  # fmt: skip


def _odd_sizes(images: list[Path], folder: Path) -> list[Path]:
    """The shapes images resized to different sizes and aspect ratios (batches get padding)."""
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i, (path, size) in enumerate(zip(images, [(48, 48), (64, 40), (36, 52), (70, 70)], strict=False)):
        target = folder / f"odd{i}.png"
        Image.open(path).convert("RGB").resize(size, Image.BILINEAR).save(target)
        out.append(target)
    return out


def _cf_predict(run: Path, images: list[Path], out: Path, *extra: str) -> list[dict]:
    code = run_cf(["predict", "--ckpt", str(run), *map(str, images), "--out", str(out),
                   "--device", "cpu", "--score-threshold", "0", "--workers", "0", *extra])  # fmt: skip
    assert code == 0
    return json.loads((out / "predictions.json").read_text())


def _same_as_cf_predict(run: Path, images: list[Path], out: Path) -> None:
    records = _cf_predict(run, images, out, "--batch-size", "2")
    predictor = clusterformer.load(run, device="cpu", score_threshold=0.0, batch_size=2)
    preds = predictor(images)
    assert [p.to_dict() for p in preds] == records
    for image, pred, record in zip(images, preds, records, strict=True):
        assert json.loads((out / f"{image.stem}.json").read_text()) == pred.to_dict()
        overlay = np.asarray(Image.open(out / f"{image.stem}.png").convert("RGB"))
        assert np.array_equal(np.asarray(pred.draw()), overlay)
        assert np.array_equal(np.asarray(pred.draw(Image.open(image))), overlay)
        assert record["image"] == str(image) and (pred.height, pred.width) == (record["height"], record["width"])


@pytest.mark.parametrize("task", TASKS)
def test_records_and_overlays_are_cf_predicts(task_runs: dict, task: str, tmp_path: Path) -> None:
    images = _odd_sizes(task_runs["images"], tmp_path / "in")
    _same_as_cf_predict(task_runs[task], images, tmp_path / "out")


@pytest.mark.shared_data
@pytest.mark.parametrize("task", TASKS)
def test_records_on_real_photos_are_cf_predicts(task_runs: dict, task: str, tmp_path: Path) -> None:
    photos = [SHARED / p for p in PHOTOS]
    if not all(p.is_file() for p in photos):
        pytest.skip(f"{SHARED}: the shared datasets are not here")
    _same_as_cf_predict(task_runs[task], photos, tmp_path / "out")


def assert_same_prediction(a: object, b: object) -> None:
    """Two predictions of one image agree: the same fields (the input's path aside), floats
    within 1e-4 (a batch of another size runs other kernels: last-bit differences), at most
    0.5% of a mask's pixels differing, records equal but for scores and boxes within rounding."""
    fields_a, fields_b = vars(a), vars(b)
    assert fields_a.keys() == fields_b.keys()
    for name, x in fields_a.items():
        y = fields_b[name]
        if name in ("image", "raw", "record"):
            continue
        if isinstance(x, torch.Tensor) and x.dtype == torch.bool:
            assert x.shape == y.shape and int((x != y).sum()) <= 0.005 * x.numel(), name
        elif isinstance(x, torch.Tensor) and x.is_floating_point():
            assert x.shape == y.shape and torch.allclose(x, y, atol=1e-4), name
        elif isinstance(x, torch.Tensor):
            assert torch.equal(x, y), name
        elif name == "segments":  # panoptic Segment records: scores within float error
            _same_json([vars(seg) for seg in x], [vars(seg) for seg in y])
        else:
            assert x == y, name
    _same_json({**a.to_dict(), "image": None}, {**b.to_dict(), "image": None})


def _same_json(x: object, y: object) -> None:
    if isinstance(x, dict):
        assert isinstance(y, dict) and x.keys() == y.keys()
        for key in x:
            if key == "rle":  # masks: compared above, pixel by pixel
                continue
            _same_json(x[key], y[key])
    elif isinstance(x, list):
        assert isinstance(y, list) and len(x) == len(y)
        for u, v in zip(x, y, strict=True):
            _same_json(u, v)
    elif isinstance(x, float):
        assert x == pytest.approx(y, abs=0.02)
    else:
        assert x == y


@pytest.mark.parametrize("task", TASKS)
def test_every_input_kind_gives_one_prediction(task_runs: dict, task: str) -> None:
    path = task_runs["images"][0]
    predictor = clusterformer.load(task_runs[task], device="cpu", score_threshold=0.0)
    pixels = np.array(Image.open(path).convert("RGB"))
    tensor = torch.from_numpy(pixels).permute(2, 0, 1)
    kinds = [str(path), path, Image.open(path), pixels, tensor, tensor.float() / 255]
    preds = predictor(kinds)
    assert [type(p) for p in preds] == [TYPES[task]] * len(kinds)
    assert [p.image for p in preds] == [str(path), str(path), None, None, None, None]
    for pred in preds[1:]:  # one batch: the same kernels, the same numbers
        assert {**pred.to_dict(), "image": None} == {**preds[0].to_dict(), "image": None}
        assert_same_prediction(pred, preds[0])
    single = predictor(pixels)  # one input, one prediction (not a list)
    assert isinstance(single, TYPES[task])
    assert_same_prediction(single, preds[0])
    with pytest.raises(ValueError, match="pass that image to draw"):
        single.draw()
    assert np.array_equal(np.asarray(single.draw(pixels)), np.asarray(preds[0].draw()))


@pytest.mark.parametrize("task", TASKS)
def test_batched_equals_one_by_one(task_runs: dict, task: str, tmp_path: Path) -> None:
    images = _odd_sizes(task_runs["images"], tmp_path)
    predictor = clusterformer.load(task_runs[task], device="cpu", score_threshold=0.0)
    batched = predictor(images, batch_size=len(images))
    alone = [predictor(image) for image in images]
    assert [p.image for p in batched] == [str(p) for p in images]
    for a, b in zip(batched, alone, strict=True):
        assert_same_prediction(a, b)


def test_a_loaded_model_is_frozen_for_inference(task_runs: dict) -> None:
    # No gradient: ops.linear then keeps oneDNN's packed weights (tests/test_linear_packed.py).
    model = clusterformer.load(task_runs["classification"], device="cpu").model
    assert not model.training and not any(p.requires_grad for p in model.parameters())


def test_typed_fields_follow_the_record(task_runs: dict) -> None:
    image = task_runs["images"][0]
    cls = clusterformer.load(task_runs["classification"], device="cpu")(image)
    record = cls.to_dict()["classes"]
    assert cls.label_names == [c["label"] for c in record] and cls.labels.dtype == torch.int64
    assert cls.scores.tolist() == pytest.approx([c["score"] for c in record], abs=1e-4)
    assert cls.probs.shape == (len(clusterformer.load(task_runs["classification"]).categories),)
    assert float(cls.probs.sum()) == pytest.approx(1.0, abs=1e-5)
    assert cls.top_k[0][0] == record[0]["label"]
    for threshold, limit in ((0.0, 100), (0.0, 3), (0.5, 100)):
        det = clusterformer.load(task_runs["detection"], device="cpu", score_threshold=threshold,
                                 max_detections=limit)(image)  # fmt: skip
        dets = det.to_dict()["detections"]
        assert len(det.boxes) == len(dets) <= limit and det.boxes.shape == (len(dets), 4)
        want = torch.tensor([d["box_xyxy"] for d in dets]).reshape(-1, 4)
        assert torch.allclose(det.boxes, want, atol=0.01)
        assert det.category_ids.tolist() == [d["category_id"] for d in dets]
        assert bool((det.scores >= threshold).all())
    sem = clusterformer.load(task_runs["semantic"], device="cpu")(image)
    assert sem.label_map.shape == (sem.height, sem.width) and sem.label_map.dtype == torch.int64
    assert sem.labels.tolist() == [s["train_id"] for s in sem.to_dict()["segments"]]
    pan = clusterformer.load(task_runs["panoptic"], device="cpu")(image)
    segments = pan.to_dict()["segments"]
    assert [s.id for s in pan.segments] == [s["id"] for s in segments] and segments
    assert pan.masks.sum((1, 2)).tolist() == [s["area"] for s in segments]


@pytest.mark.parametrize("task", ("classification", "detection"))
def test_features_are_the_backbones_maps(task_runs: dict, task: str) -> None:
    predictor = clusterformer.load(task_runs[task], device="cpu")
    images = task_runs["images"][:2]
    maps = predictor.features(images)
    batch = predictor.collate(images)
    height, width = batch["images"].shape[-2:]
    assert len(maps) == 4
    for stride, fmap in zip((4, 8, 16, 32), maps, strict=True):
        assert fmap.ndim == 4 and fmap.shape[0] == 2 and fmap.dtype == torch.float32
        assert fmap.shape[-2:] == (-(-height // stride), -(-width // stride))
    assert [m.shape[1] for m in maps] == sorted(m.shape[1] for m in maps)  # channels grow
    one = predictor.features(images[0])
    assert [m.shape[0] for m in one] == [1] * 4
    assert torch.allclose(one[-1], maps[-1][:1], atol=1e-4)
    direct = predictor.features(batch["images"])  # an already normalised batch
    assert [m.shape for m in direct] == [m.shape for m in maps]


def test_bad_inputs_and_settings_are_named(task_runs: dict, tmp_path: Path) -> None:
    run = task_runs["classification"]
    predictor = clusterformer.load(run, device="cpu")
    with pytest.raises(TypeError, match="give a path, a PIL image"):
        predictor(3.5)
    with pytest.raises(ValueError, match=r"\(H, W, 3\)"):
        predictor(np.zeros((4, 4, 3), np.float32))
    with pytest.raises(ValueError, match=r"values in \[0, 1\]"):
        predictor(torch.full((3, 8, 8), 255.0))
    with pytest.raises(FileNotFoundError):
        predictor(tmp_path / "missing.jpg")
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image")
    with pytest.raises(ValueError, match=r"broken\.jpg: cannot decode"):
        predictor([task_runs["images"][0], broken])
    for kwargs, words in (({"score_threshold": 2.0}, "score_threshold must be in"),
                          ({"amp": "fp8"}, "amp must be one of"),
                          ({"image_size": 10**6}, "image_size 1000000"),
                          ({"slide": (32, 16)}, "--slide: the classification task"),
                          ({"tta": "sideways"}, "--tta: 'sideways'")):  # fmt: skip
        with pytest.raises(SettingError, match=words) as caught:
            clusterformer.load(run, device="cpu", **kwargs)
        assert caught.value.exit_code == 2


def test_cf_commands_name_the_flag_of_a_bad_setting(task_runs: dict, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture) -> None:  # fmt: skip
    run, image = task_runs["detection"], task_runs["images"][0]
    cases = ((["predict", "--ckpt", run, image, "--out", tmp_path / "p", "--amp", "fp8"],
              "--amp must be one of bf16, fp16, none, got 'fp8'"),
             (["predict", "--ckpt", run, image, "--out", tmp_path / "p", "--max-dets", "0"],
              "--max-detections must be >= 1, got 0"),
             (["eval", "--ckpt", run, "--data", image.parent, "--amp", "fp8"],
              "--amp must be one of"))  # fmt: skip
    for argv, words in cases:
        assert run_cf([str(a) for a in argv]) == 2
        assert words in capsys.readouterr().err


def _diverged(run: Path, target: Path) -> Path:
    """A copy of ``run``'s weights whose last layer is scaled to overflow: finite weights,
    infinite outputs."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from clusterformer.engine.checkpoint import resolve_checkpoint

    source = resolve_checkpoint(run)
    with safe_open(str(source), "pt") as f:
        metadata = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no iter
    head = [k for k in tensors if k.startswith("head.") and k.endswith("weight")]
    assert head, sorted(tensors)[-5:]
    tensors[head[0]] = tensors[head[0]] * 3e38
    save_file(tensors, str(target), metadata=metadata)
    return target


def test_nan_outputs_stop_predictor_predict_and_eval_naming_the_checkpoint(
    task_runs: dict, tmp_path: Path, capsys: pytest.CaptureFixture,
) -> None:  # fmt: skip
    bad = _diverged(task_runs["classification"], tmp_path / "diverged.safetensors")
    image = task_runs["images"][0]
    predictor = clusterformer.load(bad, device="cpu")
    with pytest.raises(FloatingPointError, match=rf"diverged\.safetensors: model output is NaN or "
                                                 rf"infinite on {image}: the weights are unusable"):  # fmt: skip
        predictor(image)
    with pytest.raises(FloatingPointError, match="in memory"):
        predictor(np.asarray(Image.open(image).convert("RGB")))
    assert run_cf(["predict", "--ckpt", str(bad), str(image), "--out", str(tmp_path / "p"),
                   "--device", "cpu"]) == 1  # fmt: skip
    err = capsys.readouterr().err
    assert f"diverged.safetensors: model output is NaN or infinite on {image}" in err
    assert not (tmp_path / "p" / f"{image.stem}.png").exists()
    shutil.rmtree(tmp_path / "p", ignore_errors=True)
    shards = task_runs["shards"]["classification"]
    assert run_cf(["eval", "--ckpt", str(bad), "--data", str(shards), "--device", "cpu"]) == 1
    err = capsys.readouterr().err
    assert "diverged.safetensors: model output is NaN or infinite (batch with sample" in err
