"""mIoU / aAcc: hand-built cases, mmsegmentation's intersect-and-union as the oracle, files."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from clusterformer.data import LoaderSpec, build_loader, load_dataset_info, make_shapes
from clusterformer.data.images import decode_label_map
from clusterformer.metrics.seg_common import to_original_size
from clusterformer.metrics.semantic import (
    SemanticEvaluator,
    confusion_matrix,
    score_semantic_folder,
    semantic_metrics,
)


def mmseg_miou(preds, labels, num_classes, ignore_index=255):
    """mmseg's ``intersect_and_union`` + ``total_area_to_metrics`` (written independently)."""
    total = torch.zeros(4, num_classes, dtype=torch.float64)
    for pred, label in zip(preds, labels, strict=True):
        pred, label = torch.as_tensor(pred), torch.as_tensor(label)
        keep = label != ignore_index
        pred, label = pred[keep].double(), label[keep].double()
        inter = pred[pred == label]
        hist = [torch.histc(x, bins=num_classes, min=0, max=num_classes - 1)
                for x in (inter, pred, label)]  # fmt: skip
        total += torch.stack([hist[0], hist[1], hist[2], hist[1] + hist[2] - hist[0]])
    iou = total[0] / total[3]  # nan where the union is empty
    return 100 * float(np.nanmean(iou.numpy())), 100 * float(total[0].sum() / total[2].sum())


def test_hand_built():
    gt = np.array([[0, 0, 1, 1], [0, 0, 1, 1], [255, 255, 2, 2]])
    pred = np.array([[0, 1, 1, 1], [0, 0, 1, 3], [1, 1, 2, 3]])
    conf = confusion_matrix(pred, gt, num_classes=4)
    assert conf.shape == (4, 5) and conf.sum() == 10  # the two ignored pixels are not counted
    m = semantic_metrics(conf, names=["a", "b", "c", "d"], per_class=True)
    # a: TP 3, union 4; b: GT 4, pred 4 (one on a), TP 3 -> 3/5; c: 1/2; d only predicted: 0.
    assert m["IoU/a"] == pytest.approx(75.0)
    assert m["IoU/b"] == pytest.approx(60.0)
    assert m["IoU/c"] == pytest.approx(50.0)
    assert m["IoU/d"] == pytest.approx(0.0)
    assert m["mIoU"] == pytest.approx((75 + 60 + 50 + 0) / 4)
    assert m["aAcc"] == pytest.approx(70.0)


def test_absent_class_skipped_and_out_of_range_prediction():
    gt = np.array([[0, 0], [1, 1]])
    pred = np.array([[0, 255], [1, 1]])  # 255 predicted (not a class): wrong for class 0
    m = semantic_metrics(confusion_matrix(pred, gt, num_classes=3), per_class=True)
    assert m["IoU/2"] == -1.0  # neither in GT nor predicted: left out of the mean
    assert m["mIoU"] == pytest.approx((50.0 + 100.0) / 2)
    assert m["aAcc"] == pytest.approx(75.0)
    assert semantic_metrics(np.zeros((3, 4)))["mIoU"] == -1.0


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 10_000), st.integers(2, 7))
def test_matches_mmseg_definition(seed, num_classes):
    rng = np.random.default_rng(seed)
    preds, labels = [], []
    conf = np.zeros((num_classes, num_classes + 1), dtype=np.int64)
    for _ in range(3):
        label = rng.integers(0, num_classes, size=(9, 7))
        label[rng.random(label.shape) < 0.2] = 255
        pred = np.where(
            rng.random(label.shape) < 0.6, label, rng.integers(0, num_classes, label.shape)
        )
        pred = np.where(pred == 255, 0, pred)
        preds.append(pred)
        labels.append(label)
        conf += confusion_matrix(pred, label, num_classes)
    miou, aacc = mmseg_miou(preds, labels, num_classes)
    m = semantic_metrics(conf)
    assert m["mIoU"] == pytest.approx(miou, abs=1e-9)
    assert m["aAcc"] == pytest.approx(aacc, abs=1e-9)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("sem") / "raw"
    make_shapes(root, num_images=6, image_size=48, seed=1)
    return root


def test_ground_truth_folder_is_100(shapes):
    m = score_semantic_folder(shapes / "semantic", shapes, task="semantic")
    assert (m["mIoU"], m["aAcc"], m["num_images"]) == (100.0, 100.0, 6.0)


def test_perturbed_folder_against_hand_computation(shapes, tmp_path):
    """Own label values (0 = other, k = class k - 1) reduced by hand, scored as mmseg would."""
    rng = np.random.default_rng(0)
    preds, labels = [], []
    for png in sorted((shapes / "semantic").glob("*.png")):
        raw = decode_label_map(png.read_bytes())
        pred = raw.copy()
        noise = rng.random(raw.shape) < 0.25
        pred[noise] = rng.integers(0, 8, size=int(noise.sum()))  # includes 0 = "other"
        pred = np.roll(pred, 2, axis=1)
        Image.fromarray(pred.astype(np.uint8), mode="L").save(tmp_path / png.name)
        labels.append(np.where(raw == 0, 255, raw - 1))
        preds.append(np.where(pred == 0, 255, pred - 1))  # "other" predicted: never correct
    num_classes = len(load_dataset_info(shapes, "semantic")["categories"])
    keep = [p != 255 for p in preds]
    # mmseg's histc drops predictions outside 0..C-1 from area_pred but keeps them in area_label.
    miou, aacc = mmseg_miou([np.where(k, p, -1) for p, k in zip(preds, keep, strict=True)],
                            labels, num_classes)  # fmt: skip
    m = score_semantic_folder(tmp_path, shapes, task="semantic")
    assert m["mIoU"] == pytest.approx(miou, abs=1e-9) and m["mIoU"] < 100
    assert m["aAcc"] == pytest.approx(aacc, abs=1e-9)


@pytest.mark.parametrize("image_size", [48, 32])
def test_evaluator_batch_sizes_and_written_predictions(shapes, tmp_path, image_size):
    categories = load_dataset_info(shapes, "semantic")["categories"]
    results = []
    for batch_size in (1, 4):
        out = tmp_path / f"pred{batch_size}"
        ev = SemanticEvaluator(categories, predictions_out=out)
        spec = LoaderSpec(batch_size=batch_size, image_size=image_size, train=False)
        for batch in build_loader(shapes, "semantic", spec):
            preds = []
            for t in batch["targets"]:
                gt = to_original_size(t["semantic"], t["orig_size"])
                wrong = torch.where(gt % 3 == 0, (gt + 1) % len(categories), gt)
                preds.append(torch.where(gt == 255, 0, wrong))
            ev.update(preds, batch)
        results.append(ev.compute())
        rescored = score_semantic_folder(out, shapes, task="semantic") if image_size == 48 else None
        if rescored is not None:
            assert rescored["mIoU"] == pytest.approx(results[-1]["mIoU"], abs=1e-9)
    assert results[0] == results[1] and 0 < results[0]["mIoU"] < 100


def _batches(rank: int, world: int):
    """Tiny hand-made batches for every evaluator: image i goes to rank i % world."""
    rng = np.random.default_rng(0)
    for i in range(4):
        gt = torch.as_tensor(rng.integers(0, 3, (6, 5)))
        pred = torch.where(torch.as_tensor(rng.random((6, 5)) < 0.7), gt, (gt + 1) % 3)
        if i % world != rank:
            continue
        masks = torch.stack([gt == c for c in range(3)])
        target = {"semantic": gt, "masks": masks, "labels": torch.arange(3),
                  "segment_ids": torch.arange(1, 4), "iscrowd": torch.zeros(3, dtype=torch.bool),
                  "isthing": torch.ones(3, dtype=torch.bool), "boxes": torch.zeros(3, 4),
                  "orig_size": (6, 5), "size": (6, 5), "image_id": i, "key": f"k{i}"}  # fmt: skip
        pmasks = torch.stack([pred == c for c in range(3)])
        preds = {"semantic": pred, "panoptic": {"panoptic": pred + 1, "segments": [
                     {"id": c + 1, "category_id": c} for c in range(3) if (pred == c).any()]},
                 "instance": {"masks": pmasks, "labels": torch.arange(3),
                              "scores": torch.tensor([0.9, 0.8, 0.7])}}  # fmt: skip
        yield preds, {"targets": [target]}


def _all_metrics(rank: int, world: int) -> dict:
    from clusterformer.metrics import instance, panoptic, semantic

    cats = [{"id": c + 1, "name": str(c), "isthing": c != 2, "train_id": c} for c in range(3)]
    evs = {name: mod.build_evaluator(cats) for name, mod in
           (("semantic", semantic), ("panoptic", panoptic), ("instance", instance))}  # fmt: skip
    for preds, batch in _batches(rank, world):
        for name, ev in evs.items():
            ev.update([preds[name]], batch)
    return {name: ev.compute() for name, ev in evs.items()}


def _worker(rank: int, world: int, port: int, out: str) -> None:
    import json

    torch.distributed.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    try:
        metrics = _all_metrics(rank, world)
        with open(f"{out}.{rank}", "w") as handle:
            json.dump(metrics, handle)
    finally:
        torch.distributed.destroy_process_group()


def test_reduction_across_two_ranks_equals_one_process(tmp_path):
    import json
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    torch.multiprocessing.spawn(_worker, args=(2, port, str(tmp_path / "m")), nprocs=2)
    single = _all_metrics(0, 1)
    for rank in range(2):
        got = json.loads((tmp_path / f"m.{rank}").read_text())
        assert got.keys() == single.keys()
        for name in single:
            assert got[name] == pytest.approx(single[name], abs=1e-9), (rank, name)
    assert 0 < single["semantic"]["mIoU"] < 100 and single["semantic"]["num_images"] == 4
