"""Semantic segmentation: mIoU and aAcc from a confusion matrix (mmsegmentation's definition).

Conventions: ground truth in train ids with 255 = ignore (ADE20K's label 0 "other"
is ignored and labels 1..150 become classes 0..149 when the data is decoded); pixels whose
ground truth is ignored (or outside 0..C-1) are not counted. A prediction outside 0..C-1
(e.g. "other" in a prediction PNG) is counted in an extra column: wrong for every class.
``IoU_c = TP_c / (GT_c + Pred_c - TP_c)``; mIoU is the mean over classes whose union of ground
truth and prediction is non-empty (a class only predicted counts as 0), aAcc = correct pixels /
counted pixels. Both in percent; ``-1`` when nothing was counted.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from clusterformer.metrics.seg_common import (
    as_numpy,
    atomic_write_bytes,
    distributed,
    iter_label_records,
    prediction_file,
    real_images,
    stem_of,
    to_original_size,
)

METRIC_KEYS: tuple[str, ...] = ("mIoU", "aAcc")
IGNORE_INDEX = 255


def confusion_matrix(
    pred: Any, target: Any, num_classes: int, ignore_index: int = IGNORE_INDEX
) -> np.ndarray:
    """Pixel counts of (ground-truth class, predicted class).

    Args:
        pred: (H, W) int predicted train ids. target: (H, W) int ground-truth train ids.
    Returns:
        int64 (C, C + 1): rows ground truth 0..C-1, columns prediction 0..C-1 and a last column
        for predictions outside 0..C-1. Pixels with ``target == ignore_index`` or outside
        0..C-1 are left out.
    """
    pred, target = as_numpy(pred).astype(np.int64), as_numpy(target).astype(np.int64)
    if pred.shape != target.shape:
        raise ValueError(f"prediction is {pred.shape}, ground truth is {target.shape}")
    keep = (target != ignore_index) & (target >= 0) & (target < num_classes)
    cols = pred[keep]
    cols = np.where((cols >= 0) & (cols < num_classes), cols, num_classes)
    flat = target[keep] * (num_classes + 1) + cols
    counts = np.bincount(flat, minlength=num_classes * (num_classes + 1))
    return counts.reshape(num_classes, num_classes + 1).astype(np.int64)


def semantic_metrics(
    conf: np.ndarray, names: Sequence[str] | None = None, per_class: bool = False
) -> dict[str, float]:
    """``mIoU`` and ``aAcc`` (percent) of a (C, C + 1) confusion matrix.

    With ``per_class``, adds ``IoU/<name>`` for each class (``nan``-free: ``-1`` where the class
    is absent from both ground truth and prediction) and ``Acc/<name>`` (its pixels labelled
    right, mmsegmentation's per-class Acc; ``-1`` where it has no ground-truth pixel).
    """
    conf = np.asarray(conf, dtype=np.float64)
    num_classes = conf.shape[0]
    tp = np.diag(conf[:, :num_classes])
    union = conf.sum(1) + conf[:, :num_classes].sum(0) - tp
    present = union > 0
    iou = np.divide(tp, union, out=np.zeros_like(tp), where=present)
    total = conf.sum()
    out = {
        "mIoU": float(iou[present].mean() * 100) if present.any() else -1.0,
        "aAcc": float(tp.sum() / total * 100) if total > 0 else -1.0,
    }
    if per_class:
        labels = list(names) if names is not None else [str(c) for c in range(num_classes)]
        gt_pixels = conf.sum(1)
        for c, name in enumerate(labels):
            out[f"IoU/{name}"] = float(iou[c] * 100) if present[c] else -1.0
            out[f"Acc/{name}"] = float(tp[c] / gt_pixels[c] * 100) if gt_pixels[c] > 0 else -1.0
    return out


def _label_png(values: np.ndarray) -> bytes:
    from PIL import Image

    image = (Image.fromarray(values.astype(np.uint8), mode="L") if values.max(initial=0) < 256
             else Image.fromarray(values.astype(np.uint16)))  # fmt: skip
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


class SemanticEvaluator:
    """Accumulates a confusion matrix; ``compute`` sums it over ranks (all_reduce).

    ``update(predictions, batch)``: predictions are (H, W) int train-id maps at each image's
    ORIGINAL size; ground truth is ``batch["targets"][i]["semantic"]``, brought back to
    ``orig_size`` (nearest-exact) when the loader resized it. Entries with ``batch["valid"]``
    False are skipped. ``predictions_out``: a folder; each prediction is written there as
    ``<key>.png`` in the dataset's own label values (re-scorable with
    ``cf eval --task semantic --predictions``).
    """

    def __init__(
        self,
        categories: Sequence[dict],
        ignore_index: int = IGNORE_INDEX,
        predictions_out: str | os.PathLike | None = None,
        per_class: bool = False,
    ) -> None:
        self.categories = list(categories)
        self.per_class = per_class
        self.num_classes = len(self.categories)
        self.ignore_index = ignore_index
        self.predictions_out = Path(predictions_out) if predictions_out is not None else None
        self.conf = np.zeros((self.num_classes, self.num_classes + 1), dtype=np.int64)
        self.num_images = 0
        self.to_dataset = np.array([int(c["id"]) for c in self.categories], dtype=np.int64)

    def update(self, predictions: Sequence[Any], batch: dict) -> None:
        for i, pred, target in real_images(predictions, batch):
            gt = to_original_size(torch.as_tensor(target["semantic"]), target["orig_size"])
            pred_np = as_numpy(pred).astype(np.int64)
            try:
                self.conf += confusion_matrix(pred_np, gt, self.num_classes, self.ignore_index)
            except ValueError as exc:
                raise ValueError(f"image {target.get('key', i)}: {exc}") from None
            self.num_images += 1
            if self.predictions_out is not None:
                ok = (pred_np >= 0) & (pred_np < self.num_classes)
                values = np.where(ok, self.to_dataset[np.clip(pred_np, 0, self.num_classes - 1)], 0)
                path = prediction_file(self.predictions_out, target.get("key", i))
                atomic_write_bytes(path, _label_png(values))

    def compute(self) -> dict[str, float]:
        conf, count = self.conf, self.num_images
        if distributed():
            flat = torch.from_numpy(np.append(conf.ravel(), count))
            torch.distributed.all_reduce(flat)
            conf, count = flat[:-1].numpy().reshape(conf.shape), int(flat[-1])
        names = [str(c.get("name", c["id"])) for c in self.categories]
        return {**semantic_metrics(conf, names, per_class=self.per_class), "num_images": int(count)}

    def class_names(self) -> list[str]:
        return [str(c.get("name", c["id"])) for c in self.categories]

    def confusion_matrix(self) -> tuple[np.ndarray, list[str]]:
        """(C, C) pixel counts of this process, rows ground truth, columns prediction (the
        count of predictions outside the classes, never made by a model, left out); names."""
        return self.conf[:, : self.num_classes].copy(), self.class_names()

    def per_class_metrics(self) -> dict[str, float]:
        """``IoU/<class>`` in percent of each class in the ground truth or the predictions."""
        values = semantic_metrics(self.conf, self.class_names(), per_class=True)
        return {k: v for k, v in values.items() if k.startswith("IoU/") and v >= 0}


def build_evaluator(
    categories: Sequence[dict], predictions_out: str | os.PathLike | None = None
) -> SemanticEvaluator:
    """The semantic evaluator (mIoU, aAcc)."""
    return SemanticEvaluator(categories, predictions_out=predictions_out)


def score_semantic_folder(
    pred_dir: str | os.PathLike, data: str | os.PathLike, *, task: str, num_workers: int = 0,
    per_class: bool = False,
) -> dict[str, float]:
    """``cf eval --task semantic --predictions DIR``: mIoU/aAcc of a folder of label PNGs.

    Each image's prediction is ``DIR/<image stem>.png`` (or ``<key>.png``), a single-channel
    PNG at the image's size in the dataset's OWN label values (ADE20K: 1..150 classes, 0 =
    "other"), mapped to train ids as the ground truth is. Ground truth is read at original
    resolution from ``data`` (shards or a raw folder). ``num_workers`` is accepted for symmetry.
    """
    from clusterformer.data.categories import semantic_lut
    from clusterformer.data.errors import ImageDecodeError
    from clusterformer.data.images import decode_label_map

    pred_dir = Path(pred_dir)
    if not pred_dir.is_dir():
        raise FileNotFoundError(f"{pred_dir}: predictions folder (label PNGs) not found")
    info, records = iter_label_records(data, task)
    categories = info["categories"]
    num_classes = len(categories)
    allowed = {int(c["id"]) for c in categories} | {int(info.get("label_ignore_value", 0))}
    conf = np.zeros((num_classes, num_classes + 1), dtype=np.int64)
    count = 0
    for annotation, label_png in records:
        raw = decode_label_map(label_png or b"", f"sample {annotation.get('key')} label")
        gt = semantic_lut(categories, max(int(raw.max(initial=0)), 255))[raw]
        candidates = [prediction_file(pred_dir, stem_of(annotation)),
                      prediction_file(pred_dir, annotation["key"])]
        path = next((p for p in candidates if p.is_file()), None)
        if path is None:
            raise FileNotFoundError(f"{candidates[0]}: prediction PNG not found for image "
                                    f"'{annotation.get('file_name', annotation['key'])}'")  # fmt: skip
        try:
            pred = decode_label_map(path.read_bytes(), str(path))
        except ImageDecodeError as exc:
            raise ValueError(f"{path}: {exc.reason}") from None
        if pred.shape != gt.shape:
            raise ValueError(f"{path}: prediction is {pred.shape[1]}x{pred.shape[0]}, the image "
                             f"is {gt.shape[1]}x{gt.shape[0]}")  # fmt: skip
        unknown = sorted(set(np.unique(pred).tolist()) - allowed)
        if unknown:
            raise ValueError(f"{path}: label values {unknown[:6]} are not classes of {data}")
        lut = semantic_lut(categories, max(int(pred.max(initial=0)), 255))
        conf += confusion_matrix(lut[pred], gt, num_classes)
        count += 1
    names = [str(c.get("name", c["id"])) for c in categories]
    return {**semantic_metrics(conf, names, per_class=per_class), "num_images": count}
