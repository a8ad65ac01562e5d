"""Panoptic quality (PQ, SQ, RQ) computed natively, exactly as panopticapi's ``pq_compute``.

Per image (``pq_image_stats``): segment id 0 is void; a ground-truth and a predicted segment of
the same category match when IoU > 0.5, where the union leaves out the prediction's void
pixels; crowd ground truth never matches and is not a false negative; an unmatched prediction
is not a false positive when more than half of its area lies on void or on a crowd region of
its category. Ground-truth areas come from segments_info's "area" (pixel counts otherwise),
predicted areas from the PNG. Averages (``pq_metrics``) skip categories with no ground truth
and no prediction. Keys (percent): ``PQ``, ``SQ``, ``RQ`` (all), ``PQ_th``, ``PQ_st``; a group
with no counted category reports -1 (panopticapi would divide by zero).
"""

from __future__ import annotations

import io
import json
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
    gather_lists,
    is_rank0,
    iter_label_records,
    prediction_file,
    read_json_file,
    real_images,
    to_original_size,
)

METRIC_KEYS: tuple[str, ...] = ("PQ", "SQ", "RQ", "PQ_th", "PQ_st")
OFFSET = 256 * 256 * 256
VOID = 0


def pq_image_stats(
    gt_ids: Any,
    gt_segments: Sequence[dict],
    pred_ids: Any,
    pred_segments: Sequence[dict],
    categories: Sequence[dict],
) -> np.ndarray:
    """One image's PQ statistics.

    Args:
        gt_ids, pred_ids: (H, W) int segment ids (0 = void).
        gt_segments: ``{"id", "category_id", "iscrowd"[, "area"]}`` (dataset category ids).
        pred_segments: ``{"id", "category_id"}`` (dataset category ids).
        categories: the dataset's categories; row r of the result is ``categories[r]``.
    Returns:
        float64 (C, 4): summed IoU of matches, TP, FP, FN per category.
    Raises:
        ValueError: sizes differ, or the prediction's ids and segments disagree.
    """
    gt_ids, pred_ids = as_numpy(gt_ids).astype(np.int64), as_numpy(pred_ids).astype(np.int64)
    if gt_ids.shape != pred_ids.shape:
        raise ValueError(f"prediction is {pred_ids.shape[1]}x{pred_ids.shape[0]}, the ground "
                         f"truth is {gt_ids.shape[1]}x{gt_ids.shape[0]}")  # fmt: skip
    row = {int(c["id"]): r for r, c in enumerate(categories)}
    stats = np.zeros((len(categories), 4), dtype=np.float64)
    pred_segms = {int(s["id"]): dict(s) for s in pred_segments}
    if len(pred_segms) != len(pred_segments):
        raise ValueError("segments_info lists the same segment id twice")
    labels, counts = np.unique(pred_ids, return_counts=True)
    unlisted = [int(v) for v in labels if int(v) not in pred_segms and int(v) != VOID]
    if unlisted:
        raise ValueError(f"segment ids {unlisted[:6]} are in the PNG but not in segments_info")
    for label, count in zip(labels.tolist(), counts.tolist(), strict=True):
        if label in pred_segms:
            pred_segms[label]["area"] = count
    missing = sorted(set(pred_segms) - set(labels.tolist()))
    if missing:
        raise ValueError(f"segment ids {missing[:6]} are in segments_info but not in the PNG")
    for seg_id, seg in pred_segms.items():
        if int(seg["category_id"]) not in row:
            raise ValueError(f"segment {seg_id} has unknown category_id {seg['category_id']}")
    gt_segms = {int(s["id"]): s for s in gt_segments}
    gt_area = dict(zip(*np.unique(gt_ids, return_counts=True), strict=True))
    joint, inter = np.unique(gt_ids * OFFSET + pred_ids, return_counts=True)
    pairs = {(int(j // OFFSET), int(j % OFFSET)): int(n) for j, n in zip(joint, inter, strict=True)}

    gt_matched, pred_matched = set(), set()
    for (gt_label, pred_label), intersection in pairs.items():
        if gt_label not in gt_segms or pred_label not in pred_segms:
            continue
        gt, pred = gt_segms[gt_label], pred_segms[pred_label]
        if int(gt.get("iscrowd", 0)) == 1 or int(gt["category_id"]) != int(pred["category_id"]):
            continue
        area = int(gt["area"]) if "area" in gt else int(gt_area.get(gt_label, 0))
        union = pred["area"] + area - intersection - pairs.get((VOID, pred_label), 0)
        iou = intersection / union
        if iou > 0.5:
            r = row[int(gt["category_id"])]
            stats[r, 0] += iou
            stats[r, 1] += 1
            gt_matched.add(gt_label)
            pred_matched.add(pred_label)
    crowd_by_category = {}
    for gt_label, gt in gt_segms.items():
        if gt_label in gt_matched:
            continue
        if int(gt.get("iscrowd", 0)) == 1:
            crowd_by_category[int(gt["category_id"])] = gt_label
            continue
        stats[row[int(gt["category_id"])], 3] += 1
    for pred_label, pred in pred_segms.items():
        if pred_label in pred_matched:
            continue
        ignored = pairs.get((VOID, pred_label), 0)
        crowd = crowd_by_category.get(int(pred["category_id"]))
        if crowd is not None:
            ignored += pairs.get((crowd, pred_label), 0)
        if ignored / pred["area"] > 0.5:
            continue
        stats[row[int(pred["category_id"])], 2] += 1
    return stats


def pq_metrics(
    stats: np.ndarray, categories: Sequence[dict], per_class: bool = False
) -> dict[str, float]:
    """PQ/SQ/RQ (all), PQ_th, PQ_st in percent from summed (C, 4) statistics.

    With ``per_class``, adds ``PQ/<name>``, ``SQ/<name>``, ``RQ/<name>`` (panopticapi's
    per-class values; 0 when the class is in neither ground truth nor prediction, as there).
    """
    out: dict[str, float] = {}
    per: dict[str, float] = {}
    for group, want in (("", None), ("_th", True), ("_st", False)):
        totals, n = np.zeros(3), 0
        for r, cat in enumerate(categories):
            if want is not None and bool(cat.get("isthing", True)) != want:
                continue
            iou, tp, fp, fn = stats[r]
            if tp + fp + fn == 0:
                continue
            n += 1
            denom = tp + 0.5 * fp + 0.5 * fn
            values = (iou / denom, iou / tp if tp else 0.0, tp / denom)
            totals += values
            if want is None:
                name = cat.get("name", cat["id"])
                per.update({f"{key}/{name}": float(v) * 100
                            for key, v in zip(("PQ", "SQ", "RQ"), values, strict=True)})  # fmt: skip
        result = totals / n * 100 if n else np.full(3, -1.0)
        if group == "":
            out.update(PQ=float(result[0]), SQ=float(result[1]), RQ=float(result[2]))
        else:
            out[f"PQ{group}"] = float(result[0])
    if per_class:
        absent = {f"{key}/{c.get('name', c['id'])}": 0.0 for c in categories
                  for key in ("PQ", "SQ", "RQ")}  # fmt: skip
        out.update(absent | per)
    return out


def _png_bytes(ids: np.ndarray) -> bytes:
    from PIL import Image

    from clusterformer.data.images import encode_panoptic_ids

    buffer = io.BytesIO()
    Image.fromarray(encode_panoptic_ids(ids), mode="RGB").save(buffer, format="PNG")
    return buffer.getvalue()


def _target_ground_truth(target: dict, categories: Sequence[dict]) -> tuple[np.ndarray, list]:
    """Loader target -> (H, W) id map at ``orig_size`` and its segments (dataset ids)."""
    masks = to_original_size(torch.as_tensor(target["masks"]), target["orig_size"])
    masks = as_numpy(masks).astype(bool)
    seg_ids = as_numpy(target["segment_ids"]).astype(np.int64)
    ids = np.zeros(masks.shape[-2:], dtype=np.int64)
    for mask, seg_id in zip(masks, seg_ids, strict=True):
        ids[mask] = seg_id
    present = set(np.unique(ids).tolist())
    segments = [
        {"id": int(s), "category_id": int(categories[int(label)]["id"]), "iscrowd": int(bool(c))}
        for s, label, c in zip(
            seg_ids, as_numpy(target["labels"]), as_numpy(target["iscrowd"]), strict=True
        )  # fmt: skip
        if int(s) in present  # segments lost entirely to the eval resize cannot be scored
    ]
    return ids, segments


class PanopticEvaluator:
    """Accumulates per-category PQ statistics; ``compute`` sums them over ranks.

    ``update(predictions, batch)``: one dict per image with ``panoptic`` (H, W) int segment ids
    at the ORIGINAL size (0 = void) and ``segments`` ``[{"id", "category_id" (TRAIN id)}, ...]``;
    predicted segments absent from the map are dropped. Ground truth is the target's masks
    brought back to ``orig_size`` (nearest-exact) when the loader resized them.
    ``predictions_out``: a ``NAME.json`` path; rank 0 writes the COCO panoptic JSON there and
    the PNGs into ``NAME/`` (re-scorable with ``cf eval --task panoptic --predictions``).
    """

    def __init__(
        self, categories: Sequence[dict], predictions_out: str | os.PathLike | None = None,
        per_class: bool = False,
    ) -> None:
        self.categories = list(categories)
        self.per_class = per_class
        self.predictions_out = Path(predictions_out) if predictions_out is not None else None
        self.stats = np.zeros((len(self.categories), 4), dtype=np.float64)
        self.num_images = 0
        self.written: list[dict] = []

    def update(self, predictions: Sequence[dict], batch: dict) -> None:
        for i, pred, target in real_images(predictions, batch):
            gt_ids, gt_segments = _target_ground_truth(target, self.categories)
            pred_ids = as_numpy(pred["panoptic"]).astype(np.int64)
            present = set(np.unique(pred_ids).tolist())
            segments = [
                {
                    "id": int(s["id"]),
                    "category_id": int(self.categories[int(s["category_id"])]["id"]),
                }
                for s in pred["segments"]
                if int(s["id"]) in present
            ]
            try:
                self.stats += pq_image_stats(
                    gt_ids, gt_segments, pred_ids, segments, self.categories
                )
            except ValueError as exc:
                raise ValueError(f"image {target.get('key', i)}: {exc}") from None
            self.num_images += 1
            if self.predictions_out is not None:
                folder = self.predictions_out.with_name(
                    self.predictions_out.name.removesuffix(".json")
                )
                png = prediction_file(folder, target.get("key", i))
                name = png.relative_to(folder).as_posix()
                atomic_write_bytes(png, _png_bytes(pred_ids))
                self.written.append({"image_id": int(target["image_id"]), "file_name": name,
                                     "segments_info": segments})  # fmt: skip

    def compute(self) -> dict[str, float]:
        stats, count = self.stats, self.num_images
        if distributed():
            flat = torch.from_numpy(np.append(stats.ravel(), count))
            torch.distributed.all_reduce(flat)
            stats, count = flat[:-1].numpy().reshape(stats.shape), int(flat[-1])
        written = gather_lists(self.written) if self.predictions_out is not None else []
        if self.predictions_out is not None and is_rank0():
            doc = {"annotations": written, "categories": self.categories}
            atomic_write_bytes(self.predictions_out, (json.dumps(doc) + "\n").encode())
        return {**pq_metrics(stats, self.categories, per_class=self.per_class),
                "num_images": int(count)}  # fmt: skip

    def per_class_metrics(self) -> dict[str, float]:
        """``PQ/<class>`` in percent of each class in the ground truth or the predictions
        (this process's images)."""
        seen = self.stats[:, 1:].sum(1) > 0  # tp + fp + fn
        values = pq_metrics(self.stats, self.categories, per_class=True)
        return {f"PQ/{c.get('name', c['id'])}": values[f"PQ/{c.get('name', c['id'])}"]
                for c, present in zip(self.categories, seen, strict=True) if present}  # fmt: skip


def build_evaluator(
    categories: Sequence[dict], predictions_out: str | os.PathLike | None = None
) -> PanopticEvaluator:
    """The panoptic evaluator (PQ, SQ, RQ)."""
    return PanopticEvaluator(categories, predictions_out=predictions_out)


def _load_prediction_index(pred_json: Path) -> dict[int, dict]:
    doc = read_json_file(pred_json, "panoptic predictions JSON")
    anns = doc.get("annotations") if isinstance(doc, dict) else None
    if not isinstance(anns, list):
        raise ValueError(f'{pred_json}: not a COCO panoptic file (no "annotations" list)')
    out = {}
    for i, ann in enumerate(anns):
        if not (isinstance(ann, dict) and {"image_id", "file_name", "segments_info"} <= set(ann)
                and isinstance(ann["segments_info"], list)):  # fmt: skip
            raise ValueError(f"{pred_json}: annotation {i} lacks image_id, file_name or a "
                             "segments_info list")  # fmt: skip
        for seg in ann["segments_info"]:
            if not (isinstance(seg, dict) and {"id", "category_id"} <= set(seg)):
                raise ValueError(f"{pred_json}: image {ann['image_id']}: a segment lacks id or "
                                 "category_id")  # fmt: skip
        out[int(ann["image_id"])] = ann
    return out


def score_panoptic(
    pred_json: str | os.PathLike,
    data: str | os.PathLike,
    *,
    task: str,
    num_workers: int = 0,
    per_class: bool = False,
) -> dict[str, float]:
    """``cf eval --task panoptic --predictions FILE.json``: PQ of a COCO panoptic prediction.

    The PNGs lie in the folder named as the JSON without ".json" (panopticapi's convention);
    predictions are matched to the data's images by ``image_id`` and use the dataset's category
    ids. Ground truth is read at original resolution from ``data`` (shards or a raw folder).
    """
    from clusterformer.data.errors import ImageDecodeError
    from clusterformer.data.images import decode_panoptic_png
    from clusterformer.data.paths import join_inside

    pred_json = Path(pred_json)
    by_image = _load_prediction_index(pred_json)
    folder = pred_json.with_name(pred_json.name.removesuffix(".json"))
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: PNG folder of {pred_json.name} not found (expected "
                                "beside it, named as the JSON without .json)")  # fmt: skip
    info, records = iter_label_records(data, task)
    categories = info["categories"]
    stats = np.zeros((len(categories), 4), dtype=np.float64)
    count = 0
    for annotation, label_png in records:
        image_id = int(annotation["image_id"])
        gt_ids = decode_panoptic_png(label_png or b"", f"sample {annotation.get('key')} label")
        if image_id not in by_image:
            raise ValueError(f"{pred_json}: no prediction for image id {image_id} "
                             f"('{annotation.get('file_name', annotation.get('key'))}')")  # fmt: skip
        pred = by_image[image_id]
        png = join_inside(folder, pred["file_name"], f"{pred_json}: image {image_id}: "
                          "file_name")  # a crafted JSON must not read outside its PNG folder
        if not png.is_file():
            raise FileNotFoundError(f"{png}: prediction PNG for image id {image_id} not found")
        try:
            pred_ids = decode_panoptic_png(png.read_bytes(), str(png))
            stats += pq_image_stats(gt_ids, annotation.get("segments_info", []), pred_ids,
                                    pred["segments_info"], categories)  # fmt: skip
        except ImageDecodeError as exc:
            raise ValueError(f"{png}: {exc.reason}") from None
        except ValueError as exc:
            raise ValueError(f"{png}: {exc}") from None
        count += 1
    return {**pq_metrics(stats, categories, per_class=per_class), "num_images": count}
