"""Detection task: criterion, post-processing, COCO evaluation (AP 100 on ground truth,
independent of batch size and padding) on synthetic shapes made in tmp_path."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from model_kit import fit_fixed_batch
from PIL import Image

from clusterformer.data import (
    LoaderSpec,
    build_loader,
    load_dataset_info,
    make_shapes,
    open_source,
    write_shards,
)
from clusterformer.engine.evaluate import evaluate
from clusterformer.metrics.coco import (
    CocoDetectionEvaluator,
    coco_bbox_metrics,
    score_detection_file,
)
from clusterformer.metrics.seg_common import predictions_path_for
from clusterformer.models.detector import build_detector
from clusterformer.models.registry import preset_config
from clusterformer.ops.boxes import box_xyxy_to_cxcywh
from clusterformer.tasks import build_task, task_spec
from clusterformer.tasks.detection import DetectionTask, normalised_targets, postprocess_detections

SMALL = {"hidden_dim": 32, "decoder_heads": 2, "decoder_ffn_dim": 64, "num_queries": 10,
         "decoder_layers": 3}


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A COCO folder mixing 64x64 and 80x110 images (so batches get padded), and its shards."""
    root = tmp_path_factory.mktemp("det")
    a = make_shapes(root / "a", num_images=6, image_size=64, seed=0)
    b = make_shapes(root / "b", num_images=4, image_size=80, seed=1)
    merged = root / "coco"
    (merged / "images").mkdir(parents=True)
    coco_a, coco_b = (json.loads(Path(m["instances"]).read_text()) for m in (a, b))
    images, anns = list(coco_a["images"]), list(coco_a["annotations"])
    for src in coco_a["images"]:
        shutil.copy(Path(a["images"]) / src["file_name"], merged / "images" / src["file_name"])
    for im in coco_b["images"]:  # widened to 110 px: a second aspect ratio
        name = f"b{im['file_name']}"
        wide = Image.new("RGB", (110, 80), (90, 90, 90))
        wide.paste(Image.open(Path(b["images"]) / im["file_name"]), (0, 0))
        wide.save(merged / "images" / name, quality=95)
        images.append({**im, "id": im["id"] + 100, "file_name": name, "width": 110})
    for ann in coco_b["annotations"]:
        if not ann["iscrowd"]:  # crowd RLEs carry the old 80x80 size
            anns.append({**ann, "id": ann["id"] + 1000, "image_id": ann["image_id"] + 100})
    instances = merged / "instances.json"
    instances.write_text(json.dumps({**coco_a, "images": images, "annotations": anns}))
    shards = root / "shards"
    write_shards(open_source("coco", merged / "images", instances), shards, samples_per_shard=4,
                 shuffle=False)
    return {"shards": shards, "instances": instances, "num_images": len(images),
            "num_crowd": sum(a["iscrowd"] for a in anns)}


def _model(num_classes: int = 4) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_detector(num_classes, **{**preset_config("clusterformer-nano"), **SMALL})


def _batch(shards: Path, batch_size: int, image_size: int = 64) -> dict:
    return next(iter(build_loader(str(shards), "detection", LoaderSpec(batch_size=batch_size,
                                  image_size=image_size, train=False))))


def test_build_task_and_config_roundtrip() -> None:
    task = build_task("detection", 3, top_k=50)
    assert isinstance(task, DetectionTask) and task.primary_metric == "bbox_AP"
    again = build_task("detection", 3, **task.config())
    assert again.config() == task.config() and again.options.top_k == 50
    with pytest.raises(ValueError, match="label_smoothing: not an option of the detection task"):
        build_task("detection", 3, label_smoothing=0.1)


def test_normalised_targets_drop_crowd_and_use_real_size() -> None:
    batch = {"targets": [{"boxes": torch.tensor([[10.0, 20.0, 30.0, 60.0], [0, 0, 5, 5]]),
                          "labels": torch.tensor([2, 1]), "iscrowd": torch.tensor([False, True]),
                          "size": (80, 40)}]}
    (target,) = normalised_targets(batch, torch.device("cpu"))
    assert target["labels"].tolist() == [2]
    torch.testing.assert_close(target["boxes"], torch.tensor([[0.5, 0.5, 0.5, 0.5]]))


def test_loss_falls_on_a_fixed_batch(shapes: dict) -> None:
    batch = _batch(shapes["shards"], 2)
    model, task = _model(), build_task("detection", 4)
    losses, scalars = fit_fixed_batch(task, model, batch, 15)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert min(losses[-4:]) < 0.8 * losses[0], losses
    assert {"loss_class", "loss_l1", "loss_giou", "loss_class_enc"} <= set(scalars)


def test_criterion_perfect_boxes_and_empty_images() -> None:
    task = build_task("detection", 3)
    boxes = torch.tensor([[8.0, 8.0, 24.0, 40.0]])
    batch = {"targets": [{"boxes": boxes, "labels": torch.tensor([1]), "iscrowd": torch.tensor([False]),
                          "size": (64, 32)},
                         {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64),
                          "iscrowd": torch.zeros(0, dtype=torch.bool), "size": (32, 32)}]}
    pred_boxes = torch.full((2, 4, 4), 0.3)
    pred_boxes[0, 2] = box_xyxy_to_cxcywh(boxes[0] / torch.tensor([32.0, 64.0, 32.0, 64.0]))
    outputs = {"pred_logits": torch.zeros(2, 4, 3, requires_grad=True), "pred_boxes": pred_boxes}
    loss, scalars = task.loss(outputs, batch)
    assert scalars["loss_l1"] == pytest.approx(0.0, abs=1e-6)
    assert scalars["loss_giou"] == pytest.approx(0.0, abs=1e-6)
    loss.backward()
    assert torch.isfinite(outputs["pred_logits"].grad).all()
    # no target at all: only the class term (pushing every score down) is left
    empty = {"targets": [batch["targets"][1]] * 2}
    loss, scalars = task.loss(outputs, empty)
    assert scalars["loss_l1"] == 0.0 and scalars["loss_class"] > 0


def test_postprocess_maps_boxes_to_original_pixels() -> None:
    logits = torch.full((1, 3, 2), -5.0)
    logits[0, 1, 0] = 5.0
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.2], [0.25, 0.5, 0.5, 1.0], [0.9, 0.9, 0.4, 0.4]]])
    (pred,) = postprocess_detections(logits, boxes, [(100, 200)], top_k=100)
    assert len(pred["scores"]) == 6  # min(100, Q * C)
    assert pred["labels"][0] == 0 and pred["scores"][0] == pytest.approx(torch.sigmoid(torch.tensor(5.0)).item())
    torch.testing.assert_close(pred["boxes"][0], torch.tensor([0.0, 0.0, 100.0, 100.0]))
    assert (pred["boxes"][:, 2] <= 200).all() and (pred["boxes"][:, 3] <= 100).all()  # clipped


def _perfect_outputs(batch: dict, num_queries: int = 12, num_classes: int = 4) -> dict:
    """Outputs that predict every target exactly (in the model's real-size frame)."""
    bsz = len(batch["targets"])
    logits = torch.full((bsz, num_queries, num_classes), -10.0)
    boxes = torch.full((bsz, num_queries, 4), 0.5)
    for i, target in enumerate(batch["targets"]):
        h, w = target["size"]
        n = len(target["labels"])
        boxes[i, :n] = box_xyxy_to_cxcywh(target["boxes"] / torch.tensor([w, h, w, h]))
        logits[i, torch.arange(n), target["labels"]] = 10.0
    return {"pred_logits": logits, "pred_boxes": boxes}


@pytest.mark.parametrize("image_size", [64, 50])
def test_ground_truth_through_postprocess_gives_ap_100(shapes: dict, image_size: int) -> None:
    categories = load_dataset_info(str(shapes["shards"]))["categories"]
    task = build_task("detection", categories)
    evaluator = task.evaluator()
    for batch in build_loader(str(shapes["shards"]), "detection", LoaderSpec(batch_size=3,
                              image_size=image_size, train=False)):
        evaluator.update(task.postprocess(_perfect_outputs(batch), batch), batch)
    metrics = evaluator.compute()
    assert metrics["bbox_AP"] == pytest.approx(100.0)
    assert metrics["bbox_AP50"] == pytest.approx(100.0) and metrics["bbox_AP75"] == pytest.approx(100.0)
    assert metrics["num_images"] == shapes["num_images"]


def test_score_file_ground_truth_gives_100_and_results_roundtrip(shapes: dict, tmp_path: Path) -> None:
    assert shapes["num_crowd"] > 0  # crowd regions are in the data and ignored by COCOeval
    metrics = score_detection_file(shapes["instances"], shapes["shards"], task="detection")
    assert metrics["bbox_AP"] == pytest.approx(100.0)
    coco = json.loads(shapes["instances"].read_text())
    results = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"],
                "score": 0.9} for a in coco["annotations"] if not a["iscrowd"]]
    results_file = tmp_path / "results.json"
    results_file.write_text(json.dumps(results))
    assert score_detection_file(results_file, shapes["shards"], task="detection")["bbox_AP"] == pytest.approx(100.0)
    half = results[::2]
    results_file.write_text(json.dumps(half))
    assert score_detection_file(results_file, shapes["shards"], task="detection")["bbox_AP"] < 80
    bad = [{**results[0], "image_id": 99999}]
    results_file.write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="99999"):
        score_detection_file(results_file, shapes["shards"], task="detection")


def test_empty_detections_and_metric_keys() -> None:
    cats = [{"id": 5, "name": "a"}]
    images = [{"id": 1, "height": 10, "width": 10}]
    anns = [{"image_id": 1, "category_id": 5, "bbox": [1, 1, 4, 4], "area": 16, "iscrowd": 0}]
    assert coco_bbox_metrics(images, anns, [], cats) == {"bbox_AP": 0.0, "bbox_AP50": 0.0, "bbox_AP75": 0.0}
    suffix = task_spec("detection").prediction_suffix
    assert predictions_path_for("out/metrics.json", suffix) == Path("out/metrics.detections.json")


def test_eval_identical_at_batch_size_1_and_4(shapes: dict, tmp_path: Path) -> None:
    model = _model().eval()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # random, non-degenerate heads so boxes and scores vary
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    categories = load_dataset_info(str(shapes["shards"]))["categories"]
    runs = {}
    task = build_task("detection", categories)
    for bsz in (1, 4):
        loader = build_loader(str(shapes["shards"]), "detection",
                              LoaderSpec(batch_size=bsz, image_size=72, train=False))
        runs[bsz] = evaluate(model, task, loader, device=torch.device("cpu"),
                             predictions_out=tmp_path / f"dets{bsz}.json")
    assert runs[1] == pytest.approx(runs[4], abs=1e-6)
    one, four = (json.loads((tmp_path / f"dets{b}.json").read_text()) for b in (1, 4))
    assert len(one) == len(four) == shapes["num_images"] * 40  # top-100 capped at Q * C
    key = lambda d: (d["image_id"], -d["score"], d["category_id"])  # noqa: E731
    for a, b in zip(sorted(one, key=key), sorted(four, key=key), strict=True):
        assert a["image_id"] == b["image_id"] and a["category_id"] == b["category_id"]
        assert a["score"] == pytest.approx(b["score"], abs=1e-4)
        assert a["bbox"] == pytest.approx(b["bbox"], abs=0.05)


def test_evaluator_skips_padding_entries() -> None:
    cats = [{"id": 1, "name": "x"}]
    evaluator = CocoDetectionEvaluator(cats)
    target = {"boxes": torch.tensor([[0.0, 0.0, 4.0, 4.0]]), "labels": torch.tensor([0]),
              "iscrowd": torch.tensor([False]), "image_id": 7, "orig_size": (8, 8), "size": (8, 8)}
    pred = {"scores": torch.tensor([0.9]), "labels": torch.tensor([0]), "boxes": torch.tensor([[0.0, 0.0, 4.0, 4.0]])}
    evaluator.update([pred, pred], {"targets": [target, target], "valid": torch.tensor([True, False])})
    assert len(evaluator.images) == 1
    assert evaluator.compute()["bbox_AP"] == pytest.approx(100.0)


COCO128 = Path(__file__).resolve().parents[1].parent / "shared" / "datasets" / "coco_instances" / "coco128_train2017"


@pytest.mark.slow
@pytest.mark.shared_data
def test_real_coco128_matches_official_cocoeval(tmp_path: Path) -> None:
    """Ground truth rebuilt from decoded samples scores exactly like pycocotools on the
    original annotation file (real photos, crowd RLEs, 71 categories)."""
    if not COCO128.is_dir():
        pytest.skip(f"{COCO128} not present")
    import contextlib
    import io
    import random

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    instances = COCO128 / "annotations" / "instances.json"
    assert score_detection_file(instances, COCO128, task="detection")["bbox_AP"] == pytest.approx(100.0)
    rng = random.Random(0)
    results = [
        {"image_id": a["image_id"], "category_id": a["category_id"], "score": rng.random(),
         "bbox": [a["bbox"][0] + rng.uniform(-3, 3), a["bbox"][1] + rng.uniform(-3, 3),
                  a["bbox"][2] * rng.uniform(0.85, 1.15), a["bbox"][3] * rng.uniform(0.85, 1.15)]}
        for a in json.loads(instances.read_text())["annotations"] if rng.random() > 0.2
    ]
    path = tmp_path / "results.json"
    path.write_text(json.dumps(results))
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(instances))
        official = COCOeval(gt, gt.loadRes(str(path)), "bbox")
        official.evaluate()
        official.accumulate()
        official.summarize()
    ours = score_detection_file(path, COCO128, task="detection")
    for i, key in enumerate(("bbox_AP", "bbox_AP50", "bbox_AP75")):
        assert ours[key] == pytest.approx(100 * official.stats[i], abs=1e-6)
