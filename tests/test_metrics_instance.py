"""Mask AP: ground truth as prediction, pycocotools on the source files as the oracle, evaluator."""

from __future__ import annotations

import contextlib
import io
import json
import warnings

import numpy as np
import pytest
import torch

from clusterformer.data import LoaderSpec, build_loader, load_dataset_info, make_shapes
from clusterformer.data.records import segmentation_to_mask
from clusterformer.metrics.instance import (
    InstanceEvaluator,
    encode_masks,
    load_instance_results,
    score_instance_file,
)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("inst") / "raw"
    make_shapes(root, num_images=8, image_size=64, seed=2)
    return root


def gt_results(root, rng=None, crowd_too=False):
    """COCO results from the ground truth (RLE); with ``rng``: shifted, dropped, relabelled."""
    doc = json.loads((root / "instances.json").read_text())
    sizes = {im["id"]: (im["height"], im["width"]) for im in doc["images"]}
    cat_ids = [c["id"] for c in doc["categories"]]
    out = []
    for ann in doc["annotations"]:
        if ann["iscrowd"] and not crowd_too:
            continue
        h, w = sizes[ann["image_id"]]
        mask = segmentation_to_mask(ann["segmentation"], h, w)
        cat, score = ann["category_id"], 0.9
        if rng is not None:
            if rng.random() < 0.2:
                continue
            mask = np.roll(mask, tuple(int(v) for v in rng.integers(-3, 4, 2)), axis=(0, 1))
            cat = cat if rng.random() < 0.8 else int(rng.choice(cat_ids))
            score = float(rng.random())
        out.append({"image_id": ann["image_id"], "category_id": cat,
                    "segmentation": encode_masks(mask[None])[0], "score": score})  # fmt: skip
    return out


def test_ground_truth_as_prediction_is_100(shapes, tmp_path):
    path = tmp_path / "res.json"
    path.write_text(json.dumps(gt_results(shapes)))
    m = score_instance_file(path, shapes, task="instance")
    assert all(m[k] == 100.0 for k in ("segm_AP", "segm_AP50", "segm_AP75", "bbox_AP"))


def test_crowd_regions_are_ignored(shapes, tmp_path):
    doc = json.loads((shapes / "instances.json").read_text())
    assert any(a["iscrowd"] for a in doc["annotations"])  # the fixture must hold a crowd region
    path = tmp_path / "res.json"
    path.write_text(json.dumps(gt_results(shapes, crowd_too=True)))
    assert score_instance_file(path, shapes, task="instance")["segm_AP"] == 100.0


def test_matches_cocoeval_on_source_files(shapes, tmp_path):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    results = gt_results(shapes, np.random.default_rng(0))
    path = tmp_path / "res.json"
    path.write_text(json.dumps(results))
    ours = score_instance_file(path, shapes, task="instance")
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        gt = COCO(str(shapes / "instances.json"))
        for iou_type, prefix in (("segm", "segm"), ("bbox", "bbox")):
            ev = COCOeval(gt, gt.loadRes(str(path)), iou_type)
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
            for i, suffix in enumerate(("AP", "AP50", "AP75")):
                assert ours[f"{prefix}_{suffix}"] == pytest.approx(100 * ev.stats[i], abs=1e-9)
    assert 0 < ours["segm_AP"] < 100


@pytest.mark.parametrize("image_size", [64, 40])
def test_evaluator_batch_sizes(shapes, tmp_path, image_size):
    categories = load_dataset_info(shapes, "instance")["categories"]
    rng = np.random.default_rng(1)
    results = []
    for batch_size in (1, 4):
        out = tmp_path / f"res{batch_size}.json"
        ev = InstanceEvaluator(categories, predictions_out=out)
        rng = np.random.default_rng(1)
        spec = LoaderSpec(batch_size=batch_size, image_size=image_size, train=False)
        for batch in build_loader(shapes, "instance", spec):
            preds = []
            for t in batch["targets"]:
                from clusterformer.metrics.seg_common import to_original_size

                masks = to_original_size(t["masks"], t["orig_size"])
                keep = ~t["iscrowd"]
                scores = torch.tensor(rng.random(int(keep.sum())), dtype=torch.float32)
                preds.append({"masks": masks[keep], "labels": t["labels"][keep], "scores": scores})
            ev.update(preds, batch)
        results.append(ev.compute())
        if image_size == 64:  # full size: the loop's GT equals the source's, up to polygon areas
            rescored = score_instance_file(out, shapes, task="instance")
            assert rescored["segm_AP"] == pytest.approx(results[-1]["segm_AP"], abs=1e-9)
    assert results[0] == results[1]
    assert results[0]["segm_AP"] == 100.0  # GT masks (resized back when needed) match themselves


def test_result_file_errors(shapes, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('[{"image_id": 1, "category_id": 1, "segmentation": [[0, 0, 4, 0, 4, 4]]}]')
    with pytest.raises(ValueError, match="compressed RLE"):
        load_instance_results(bad)
    entry = gt_results(shapes)[0]
    wrong = dict(entry, segmentation=encode_masks(np.ones((1, 5, 5), bool))[0])
    bad.write_text(json.dumps([wrong]))
    with pytest.raises(ValueError, match=r"bad.json: entry 0: mask size \[5, 5\]"):
        score_instance_file(bad, shapes, task="instance")
    bad.write_text(json.dumps([dict(entry, category_id=999)]))
    with pytest.raises(ValueError, match="unknown category_id 999"):
        score_instance_file(bad, shapes, task="instance")
