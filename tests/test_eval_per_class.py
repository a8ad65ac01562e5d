"""`cf eval --per-class`: per-class AP / PQ, SQ, RQ / IoU, Acc / accuracy and AP by size, AR@100,
printed and written under "per_class"; the numbers are pycocotools' own."""

from __future__ import annotations

import contextlib
import io
import json
import random
from pathlib import Path

import pytest
from cli_runner import run_cf

from clusterformer.data import make_shapes, open_source
from clusterformer.metrics.coco import coco_bbox_metrics
from clusterformer.metrics.per_class import per_class_metrics, split_per_class

COCO128 = (Path(__file__).resolve().parents[1].parent / "shared" / "datasets" / "coco_instances"
           / "coco128_train2017")  # fmt: skip


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return make_shapes(tmp_path_factory.mktemp("perclass") / "raw", num_images=6, image_size=48,
                       seed=0)  # fmt: skip


def _eval(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    capsys.readouterr()
    code = run_cf(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_split_groups_class_keys_by_class_name() -> None:
    metrics = {"PQ": 50.0, "PQ/sky": 80.0, "SQ/sky": 90.0, "PQ/a/b": 1.0, "num_images": 3}
    summary, per_class = split_per_class(metrics)
    assert summary == {"PQ": 50.0, "num_images": 3}
    assert per_class == {"sky": {"PQ": 80.0, "SQ": 90.0}, "a/b": {"PQ": 1.0}}
    assert per_class_metrics(metrics) == per_class


def test_detection_ground_truth_scores_100_per_present_class(shapes: dict, tmp_path: Path,
                                                            capsys) -> None:  # fmt: skip
    out = tmp_path / "metrics.json"
    code, printed, err = _eval(["eval", "--task", "detection", "--predictions",
                                str(shapes["instances"]), "--data", str(shapes["root"]),
                                "--per-class", "--out", str(out)], capsys)  # fmt: skip
    assert code == 0, err
    written = json.loads(out.read_text())
    doc = json.loads(Path(shapes["instances"]).read_text())
    present = {a["category_id"] for a in doc["annotations"] if not a.get("iscrowd")}
    names = {c["id"]: c["name"] for c in doc["categories"]}
    assert set(written["per_class"]) == set(names.values())
    for cid, name in names.items():
        expected = 100.0 if cid in present else -1.0
        assert written["per_class"][name] == {"bbox_AP": expected}
    for key in ("bbox_AP", "bbox_AR100"):
        assert written[key] == 100.0
    assert written["num_images"] == 6 and isinstance(written["num_images"], int)
    assert not any("/" in key for key in written)  # per-class keys only under "per_class"
    assert "per class" in printed and "bbox_AP %" in printed and "bbox_APs" in printed


def _pycocotools(images, annotations, detections, categories, cat_ids=None) -> list[float]:
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    gt = COCO()
    gt.dataset = {"images": images, "annotations": [{**a, "id": i + 1} for i, a in
                                                    enumerate(annotations)],
                  "categories": categories}  # fmt: skip
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
        ev = COCOeval(gt, gt.loadRes(detections), iouType="bbox")
        if cat_ids is not None:
            ev.params.catIds = cat_ids
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return [float(s) * 100 if s >= 0 else -1.0 for s in ev.stats]


def test_per_class_and_size_numbers_equal_pycocotools(shapes: dict) -> None:
    doc = json.loads(Path(shapes["instances"]).read_text())
    rng = random.Random(0)
    detections = []
    for ann in doc["annotations"]:  # jittered boxes, random scores, some missed, some doubled
        for _ in range(rng.choice([0, 1, 1, 2])):
            x, y, w, h = ann["bbox"]
            box = [x + rng.uniform(-3, 3), y + rng.uniform(-3, 3), w * rng.uniform(0.7, 1.2),
                   h * rng.uniform(0.7, 1.2)]  # fmt: skip
            detections.append({"image_id": ann["image_id"], "category_id": ann["category_id"],
                               "bbox": box, "score": rng.random()})  # fmt: skip
    cats = [{"id": c["id"], "name": c["name"]} for c in doc["categories"]]
    annotations = [{k: v for k, v in a.items() if k != "id"} for a in doc["annotations"]]
    ours = coco_bbox_metrics(doc["images"], annotations, detections, cats, per_class=True)
    stats = _pycocotools(doc["images"], annotations, detections, cats)
    assert [ours[k] for k in ("bbox_AP", "bbox_APs", "bbox_APm", "bbox_APl", "bbox_AR100")] == \
        pytest.approx([stats[0], stats[3], stats[4], stats[5], stats[8]], abs=1e-9)  # fmt: skip
    checked = 0
    for cat in cats:  # pycocotools itself, evaluating one category at a time
        alone = _pycocotools(doc["images"], annotations, detections, cats, [cat["id"]])[0]
        assert ours[f"bbox_AP/{cat['name']}"] == pytest.approx(alone, abs=1e-9)
        checked += 0 < alone < 100
    assert checked >= 1  # the jitter made at least one class imperfect


def test_semantic_and_panoptic_ground_truth_per_class(shapes: dict, tmp_path: Path,
                                                      capsys) -> None:  # fmt: skip
    cases = {"semantic": (shapes["semantic_masks"], {"IoU", "Acc"}),
             "panoptic": (shapes["panoptic_json"], {"PQ", "SQ", "RQ"})}  # fmt: skip
    for task, (predictions, metrics) in cases.items():
        out = tmp_path / f"{task}.json"
        code, printed, err = _eval(["eval", "--task", task, "--predictions", str(predictions),
                                    "--data", str(shapes["root"]), "--per-class",
                                    "--out", str(out)], capsys)  # fmt: skip
        assert code == 0, err
        per_class = json.loads(out.read_text())["per_class"]
        assert per_class and all(set(row) == metrics for row in per_class.values()), per_class
        scored = [v for row in per_class.values() for v in row.values() if v not in (-1.0, 0.0)]
        assert scored and all(v == 100.0 for v in scored), (task, per_class)


def test_classification_per_class_accuracy(shapes: dict, tmp_path: Path, capsys) -> None:
    source = open_source("imagefolder", shapes["classes"])
    names = [c["name"] for c in source.info["categories"]]
    predictions = {}
    right = dict.fromkeys(names, 0)
    count = dict.fromkeys(names, 0)
    for i, entry in enumerate(source.entries):
        truth = next(n for n in names if entry.key.startswith(n + "_"))
        guess = truth if truth == names[0] or i % 2 == 0 else names[0]  # class 0 always right
        predictions[entry.key] = guess
        count[truth] += 1
        right[truth] += guess == truth
    (tmp_path / "pred.json").write_text(json.dumps(predictions))
    out = tmp_path / "m.json"
    code, _, err = _eval(["eval", "--task", "classification", "--predictions",
                          str(tmp_path / "pred.json"), "--data", str(shapes["classes"]),
                          "--per-class", "--out", str(out)], capsys)  # fmt: skip
    assert code == 0, err
    per_class = json.loads(out.read_text())["per_class"]
    assert per_class == {n: {"Acc": pytest.approx(100.0 * right[n] / count[n])} for n in names}
    assert per_class[names[0]]["Acc"] == 100.0 and min(r["Acc"] for r in per_class.values()) < 100


def test_without_per_class_nothing_per_class_is_written(shapes: dict, tmp_path: Path,
                                                        capsys) -> None:  # fmt: skip
    out = tmp_path / "m.json"
    code, printed, err = _eval(["eval", "--task", "detection", "--predictions",
                                str(shapes["instances"]), "--data", str(shapes["root"]),
                                "--out", str(out)], capsys)  # fmt: skip
    assert code == 0, err
    written = json.loads(out.read_text())
    assert "per_class" not in written and "bbox_APs" not in written
    assert "per class" not in printed


def test_instance_ground_truth_per_class_masks_and_boxes(shapes: dict, tmp_path: Path,
                                                        capsys) -> None:  # fmt: skip
    from clusterformer.data.records import segmentation_to_mask
    from clusterformer.metrics.instance import encode_masks

    doc = json.loads(Path(shapes["instances"]).read_text())
    sizes = {im["id"]: (im["height"], im["width"]) for im in doc["images"]}
    results = [{"image_id": a["image_id"], "category_id": a["category_id"], "score": 1.0,
                "segmentation": encode_masks(segmentation_to_mask(
                    a["segmentation"], *sizes[a["image_id"]])[None])[0]}
               for a in doc["annotations"] if not a["iscrowd"]]  # fmt: skip
    (tmp_path / "segm.json").write_text(json.dumps(results))
    out = tmp_path / "m.json"
    code, _, err = _eval(["eval", "--task", "instance", "--predictions", str(tmp_path / "segm.json"),
                          "--data", str(shapes["root"]), "--per-class", "--out", str(out)], capsys)  # fmt: skip
    assert code == 0, err
    written = json.loads(out.read_text())
    assert written["segm_AP"] == 100.0 and written["segm_AR100"] == 100.0
    assert {"segm_APs", "segm_APm", "segm_APl", "bbox_APs", "bbox_AR100"} <= set(written)
    present = {a["category_id"] for a in doc["annotations"] if not a["iscrowd"]}
    for cat in doc["categories"]:
        row = written["per_class"][cat["name"]]
        assert set(row) == {"segm_AP", "bbox_AP"}
        assert row["segm_AP"] == (100.0 if cat["id"] in present else -1.0)


@pytest.mark.shared_data
@pytest.mark.skipif(not COCO128.is_dir(), reason="shared COCO-128 sample absent")
def test_coco128_ground_truth_prints_per_class_ap_100(tmp_path: Path, capsys) -> None:
    out = tmp_path / "coco128.json"
    code, printed, err = _eval(["eval", "--task", "detection", "--predictions",
                                str(COCO128 / "annotations" / "instances.json"),
                                "--data", str(COCO128), "--per-class", "--out", str(out)],
                               capsys)  # fmt: skip
    assert code == 0, err
    per_class = json.loads(out.read_text())["per_class"]
    present = [r["bbox_AP"] for r in per_class.values() if r["bbox_AP"] != -1.0]
    assert len(per_class) == 80 and len(present) == 71
    assert present == pytest.approx([100.0] * 71, abs=1e-9)
    assert "person" in printed and "100.00" in printed
