"""PQ / SQ / RQ: hand-built cases, panopticapi's pq_compute as the oracle, the loop evaluator."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clusterformer.data import LoaderSpec, build_loader, load_dataset_info, make_shapes
from clusterformer.data.images import decode_panoptic_png, encode_panoptic_ids
from clusterformer.metrics.panoptic import (
    PanopticEvaluator,
    pq_image_stats,
    pq_metrics,
    score_panoptic,
)

CATS = [
    {"id": 1, "name": "a", "isthing": True, "train_id": 0},
    {"id": 2, "name": "b", "isthing": True, "train_id": 1},
    {"id": 5, "name": "sky", "isthing": False, "train_id": 2},
]


def _seg(i, c, crowd=0):
    return {"id": i, "category_id": c, "iscrowd": crowd}


def test_hand_built_image():
    # GT: segment 1 (cat a, 8 px), segment 2 (cat b, 4 px), sky 3 (4 px); 4x4 image.
    gt = np.array([[1, 1, 1, 1], [1, 1, 1, 1], [2, 2, 3, 3], [2, 2, 3, 3]])
    # Prediction: 10 covers 6 of segment 1 -> IoU 6/8; 20 (cat b) is segment 2 plus 2 px of 1:
    # IoU 4/6; 30 says cat a on sky -> FP for a, sky FN.
    pred = np.array([[10, 10, 10, 10], [10, 10, 20, 20], [20, 20, 30, 30], [20, 20, 30, 30]])
    stats = pq_image_stats(gt, [_seg(1, 1), _seg(2, 2), _seg(3, 5)], pred,
                           [{"id": 10, "category_id": 1}, {"id": 20, "category_id": 2},
                            {"id": 30, "category_id": 1}], CATS)  # fmt: skip
    np.testing.assert_allclose(stats[0], [6 / 8, 1, 1, 0])
    np.testing.assert_allclose(stats[1], [4 / 6, 1, 0, 0])
    np.testing.assert_allclose(stats[2], [0, 0, 0, 1])
    m = pq_metrics(stats, CATS)
    pq_a, pq_b, pq_sky = (6 / 8) / 1.5, 4 / 6, 0.0
    assert m["PQ"] == pytest.approx(100 * (pq_a + pq_b + pq_sky) / 3)
    assert m["PQ_th"] == pytest.approx(100 * (pq_a + pq_b) / 2)
    assert m["PQ_st"] == pytest.approx(0.0)
    assert m["SQ"] == pytest.approx(100 * (6 / 8 + 4 / 6) / 3)
    assert m["RQ"] == pytest.approx(100 * (1 / 1.5 + 1 + 0) / 3)


def test_void_and_crowd_handling():
    # GT: thing 1 (6 px), crowd 2 of cat a (6 px), void 4 px.
    gt = np.array([[1, 1, 1, 0], [1, 1, 1, 0], [2, 2, 2, 0], [2, 2, 2, 0]])
    gts = [_seg(1, 1), _seg(2, 1, crowd=1)]
    # 10 = segment 1 plus the void column's top half: union leaves void out -> IoU 1.
    # 20 (cat a) lies on the crowd region: not a FP; 30 (cat b) on crowd of another class: FP.
    pred = np.array([[10, 10, 10, 10], [10, 10, 10, 10], [20, 20, 30, 0], [20, 20, 30, 0]])
    preds = [{"id": 10, "category_id": 1}, {"id": 20, "category_id": 1},
             {"id": 30, "category_id": 2}]  # fmt: skip
    stats = pq_image_stats(gt, gts, pred, preds, CATS)
    np.testing.assert_allclose(stats[0], [1.0, 1, 0, 0])
    np.testing.assert_allclose(stats[1], [0.0, 0, 1, 0])
    m = pq_metrics(stats, CATS)
    assert m["PQ_st"] == -1.0  # no stuff category has GT or prediction: skipped, reported -1
    assert m["PQ"] == pytest.approx(50.0)


def test_prediction_errors():
    gt = np.ones((2, 2), dtype=np.int64)
    with pytest.raises(ValueError, match="in the PNG but not in segments_info"):
        pq_image_stats(gt, [_seg(1, 1)], np.full((2, 2), 7), [], CATS)
    with pytest.raises(ValueError, match="in segments_info but not in the PNG"):
        pq_image_stats(gt, [_seg(1, 1)], gt, [{"id": 1, "category_id": 1},
                                              {"id": 2, "category_id": 1}], CATS)  # fmt: skip
    with pytest.raises(ValueError, match="unknown category_id 9"):
        pq_image_stats(gt, [_seg(1, 1)], gt, [{"id": 1, "category_id": 9}], CATS)
    with pytest.raises(ValueError, match="prediction is 3x2"):
        pq_image_stats(gt, [_seg(1, 1)], np.ones((2, 3)), [{"id": 1, "category_id": 1}], CATS)


# ---------------------------------------------------------------- oracle: panopticapi
def perturb_panoptic(gt_json: Path, gt_dir: Path, out_json: Path, seed: int) -> None:
    """Write a perturbed prediction (JSON + PNG folder beside it) from a panoptic ground truth:
    segments dropped to void, merged, shifted, relabelled, split; crowd flags removed."""
    rng = np.random.default_rng(seed)
    doc = json.loads(gt_json.read_text())
    cat_ids = [c["id"] for c in doc["categories"]]
    folder = out_json.with_name(out_json.name.removesuffix(".json"))
    folder.mkdir(parents=True, exist_ok=True)
    anns = []
    for ann in doc["annotations"]:
        ids = decode_panoptic_png((gt_dir / ann["file_name"]).read_bytes())
        segs = {s["id"]: {"id": s["id"], "category_id": s["category_id"]}
                for s in ann["segments_info"]}  # fmt: skip
        order = list(segs)
        rng.shuffle(order)
        ops = rng.choice(["drop", "merge", "shift", "relabel", "split", "none"], size=3)
        for op in ops:
            live = [s for s in order if s in segs and (ids == s).any()]
            if len(live) < 2:
                break
            a, b = live[0], live[1]
            if op == "drop":
                ids = np.where(ids == a, 0, ids)
            elif op == "merge":
                ids = np.where(ids == a, b, ids)
            elif op == "shift":
                dy, dx = (int(v) for v in rng.integers(-6, 7, size=2))
                moved = np.roll(np.roll(ids == a, dy, 0), dx, 1)
                ids = np.where(ids == a, 0, ids)
                ids = np.where(moved, a, ids)
            elif op == "relabel":
                segs[a]["category_id"] = int(rng.choice(cat_ids))
            elif op == "split":
                ys, xs = np.nonzero(ids == a)
                cut = ys < np.median(ys)
                new = max(segs) + 1
                ids[ys[cut], xs[cut]] = new
                segs[new] = {"id": new, "category_id": segs[a]["category_id"]}
        present = set(np.unique(ids).tolist())
        Image.fromarray(encode_panoptic_ids(ids)).save(folder / ann["file_name"])
        anns.append({"image_id": ann["image_id"], "file_name": ann["file_name"],
                     "segments_info": [s for i, s in segs.items() if i in present]})  # fmt: skip
    out_json.write_text(json.dumps({"annotations": anns, "categories": doc["categories"]}))


def oracle_pq(gt_json: Path, gt_dir: Path, pred_json: Path) -> dict:
    evaluation = pytest.importorskip(
        "panopticapi.evaluation",
        reason="panopticapi (pip install --no-deps panopticapi-lite) absent",
    )
    res = evaluation.pq_compute(str(gt_json), str(pred_json), str(gt_dir),
                                str(pred_json.with_suffix("")))  # fmt: skip
    return {"PQ": 100 * res["All"]["pq"], "SQ": 100 * res["All"]["sq"], "RQ": 100 * res["All"]["rq"],
            "PQ_th": 100 * res["Things"]["pq"], "PQ_st": 100 * res["Stuff"]["pq"]}  # fmt: skip


def void_ground_truth(raw: Path, out: Path) -> None:
    """A copy of a make-shapes panoptic ground truth with void bands (areas updated)."""
    (out / "panoptic").mkdir(parents=True)
    (out / "images").symlink_to(raw / "images")
    doc = json.loads((raw / "panoptic.json").read_text())
    for k, ann in enumerate(doc["annotations"]):
        ids = decode_panoptic_png((raw / "panoptic" / ann["file_name"]).read_bytes())
        ids[k % 5 :: 9, :] = 0
        ids[:, 3:6] = 0
        Image.fromarray(encode_panoptic_ids(ids)).save(out / "panoptic" / ann["file_name"])
        counts = dict(zip(*np.unique(ids, return_counts=True), strict=True))
        ann["segments_info"] = [dict(s, area=int(counts[s["id"]]))
                                for s in ann["segments_info"] if s["id"] in counts]  # fmt: skip
    (out / "panoptic.json").write_text(json.dumps(doc))


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pan") / "raw"
    make_shapes(root, num_images=8, image_size=64, seed=3)
    return root


def test_ground_truth_as_prediction_is_100(shapes):
    m = score_panoptic(shapes / "panoptic.json", shapes, task="panoptic")
    assert (m["PQ"], m["SQ"], m["RQ"], m["PQ_th"], m["PQ_st"]) == (100.0,) * 5
    assert m["num_images"] == 8


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_panopticapi_on_perturbed_predictions(shapes, tmp_path, seed):
    gt = tmp_path / "gt"
    void_ground_truth(shapes, gt)
    for gt_root in (shapes, gt):
        pred = tmp_path / f"pred{gt_root.name}.json"
        perturb_panoptic(gt_root / "panoptic.json", gt_root / "panoptic", pred, seed)
        ours = score_panoptic(pred, gt_root, task="panoptic")
        expected = oracle_pq(gt_root / "panoptic.json", gt_root / "panoptic", pred)
        for key, value in expected.items():
            assert ours[key] == pytest.approx(value, abs=1e-6), key
        assert ours["PQ"] < 100


def test_evaluator_equals_file_scoring_and_batch_size(shapes, tmp_path):
    """Loop evaluator (GT from loader targets at full size) == scoring the files it wrote."""
    pred_json = tmp_path / "pred.json"
    perturb_panoptic(shapes / "panoptic.json", shapes / "panoptic", pred_json, seed=5)
    preds = {a["image_id"]: a for a in json.loads(pred_json.read_text())["annotations"]}
    categories = load_dataset_info(shapes, "panoptic")["categories"]
    to_train = {c["id"]: c["train_id"] for c in categories}
    results = []
    for batch_size in (1, 4):
        out = tmp_path / f"written{batch_size}.json"
        ev = PanopticEvaluator(categories, predictions_out=out)
        spec = LoaderSpec(batch_size=batch_size, image_size=64, train=False)
        for batch in build_loader(shapes, "panoptic", spec):
            items = []
            for t in batch["targets"]:
                p = preds[int(t["image_id"])]
                ids = decode_panoptic_png((pred_json.with_suffix("") / p["file_name"]).read_bytes())
                segs = [{"id": s["id"], "category_id": to_train[s["category_id"]]}
                        for s in p["segments_info"]]  # fmt: skip
                items.append({"panoptic": ids, "segments": segs})
            ev.update(items, batch)
        results.append(ev.compute())
        rescored = score_panoptic(out, shapes, task="panoptic")
        for key in ("PQ", "SQ", "RQ", "PQ_th", "PQ_st"):
            assert results[-1][key] == pytest.approx(rescored[key], abs=1e-9)
    assert results[0] == results[1]
    assert results[0]["PQ"] == pytest.approx(score_panoptic(pred_json, shapes, task="panoptic")["PQ"], abs=1e-9)


def test_evaluator_resized_ground_truth_gt_as_prediction(shapes):
    """With the eval transform downsizing (image_size 48 < 64), GT is brought back to 64x64."""
    loader = build_loader(shapes, "panoptic", LoaderSpec(batch_size=2, image_size=48, train=False))
    categories = load_dataset_info(shapes, "panoptic")["categories"]
    from clusterformer.metrics.seg_common import to_original_size

    ev = PanopticEvaluator(categories)
    for batch in loader:
        items = []
        for t in batch["targets"]:
            masks = to_original_size(t["masks"], t["orig_size"]).numpy()
            ids = np.zeros(masks.shape[1:], dtype=np.int64)
            for m, s in zip(masks, t["segment_ids"].tolist(), strict=True):
                ids[m] = s
            items.append(
                {
                    "panoptic": ids,
                    "segments": [
                        {"id": int(s), "category_id": int(c)}
                        for s, c in zip(
                            t["segment_ids"].tolist(), t["labels"].tolist(), strict=True
                        )
                    ],
                }
            )
        ev.update(items, batch)
    assert ev.compute()["PQ"] == 100.0


@pytest.mark.slow  # ~15-25 s; opt in with `-m shared_data` (a later -m replaces addopts')
@pytest.mark.shared_data
def test_coco_val2017_100_against_panopticapi(tmp_path):
    root = Path(__file__).resolve().parents[2] / "shared/datasets/coco_panoptic/coco_val2017_100"
    if not root.is_dir():
        pytest.skip(f"{root} not present")
    data = tmp_path / "raw"
    data.mkdir()
    for name in ("images", "panoptic"):
        (data / name).symlink_to(root / name)
    shutil.copy(root / "annotations/panoptic.json", data / "panoptic.json")
    gt_json, gt_dir = root / "annotations/panoptic.json", root / "panoptic"
    # Ground truth as prediction: the folder beside a copy of the JSON is the PNG folder.
    m = score_panoptic(data / "panoptic.json", data, task="panoptic")
    assert m["PQ"] == 100.0 and m["num_images"] == 100
    pred = tmp_path / "pred.json"
    perturb_panoptic(gt_json, gt_dir, pred, seed=0)
    ours = score_panoptic(pred, data, task="panoptic")
    for key, value in oracle_pq(gt_json, gt_dir, pred).items():
        assert ours[key] == pytest.approx(value, abs=1e-6), key
