"""Instance segmentation: COCO mask AP (``COCOeval`` segm on RLE) plus box AP, the official way.

Keys (percent): ``segm_AP`` (IoU .50:.95), ``segm_AP50``, ``segm_AP75`` and ``bbox_AP``,
``bbox_AP50``, ``bbox_AP75`` (boxes given with the predictions, else the masks' boxes); maxDets
100; crowd ground truth is kept with ``iscrowd=1``, so COCOeval ignores detections matched to it.
``-1`` (COCOeval's value) means the data holds no ground truth. Results use the dataset's
ORIGINAL category ids and image ids, masks as RLE at the image's original size.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from clusterformer.metrics.coco import METRIC_KEYS as BBOX_KEYS
from clusterformer.metrics.coco_detail import cocoeval_detail, empty_detail
from clusterformer.metrics.seg_common import (
    as_numpy,
    atomic_write_bytes,
    broadcast_from_rank0,
    gather_lists,
    is_rank0,
    iter_label_records,
    read_json_file,
    real_images,
    to_original_size,
)

SEGM_KEYS: tuple[str, ...] = ("segm_AP", "segm_AP50", "segm_AP75")
# The mask keys first: segm_AP is the instance task's primary metric.
METRIC_KEYS: tuple[str, ...] = SEGM_KEYS + BBOX_KEYS


def encode_masks(masks: Any) -> list[dict]:
    """(k, H, W) bool masks -> COCO compressed RLEs (``counts`` as str, JSON-ready)."""
    from pycocotools import mask as mask_utils

    array = np.asfortranarray(as_numpy(masks).astype(np.uint8).transpose(1, 2, 0))
    rles = mask_utils.encode(array) if array.shape[-1] else []
    return [
        {"size": [int(v) for v in r["size"]], "counts": r["counts"].decode("ascii")} for r in rles
    ]


def _run_cocoeval(gt: Any, results: list[dict], iou_type: str, categories: Sequence[dict],
                  per_class: bool) -> dict[str, float]:  # fmt: skip
    from pycocotools.cocoeval import COCOeval

    dt = gt.loadRes(results)
    coco_eval = COCOeval(gt, dt, iouType=iou_type)
    coco_eval.params.maxDets = [1, 10, 100]
    coco_eval.evaluate()
    coco_eval.accumulate()
    coco_eval.summarize()
    keys = SEGM_KEYS if iou_type == "segm" else BBOX_KEYS
    out = {k: float(s) * 100 if s >= 0 else -1.0 for k, s in zip(keys, coco_eval.stats[:3], strict=True)}
    return {**out, **(cocoeval_detail(coco_eval, iou_type, categories) if per_class else {})}


def coco_instance_metrics(
    images: Sequence[dict],
    annotations: Sequence[dict],
    results: Sequence[dict],
    categories: Sequence[dict],
    per_class: bool = False,
) -> dict[str, float]:
    """COCOeval segm and bbox on ground-truth annotations (polygons or RLE) and RLE results;
    with ``per_class`` also AP by size, AR@100 and AP per class for both (``segm_APs``,
    ``segm_AP/<name>``, ``bbox_APs``, ...).

    Args:
        images: ``{"id", "height", "width"}``. annotations: COCO annotations (``image_id``,
            ``category_id``, ``segmentation``, ``bbox``, ``area``, ``iscrowd``). results:
            ``{"image_id", "category_id", "segmentation" (RLE), "score"[, "bbox" xywh]}``.
    Raises:
        ValueError: duplicate images, or results for unknown images / categories / sizes.
    """
    from pycocotools.coco import COCO

    sizes = {int(im["id"]): [int(im["height"]), int(im["width"])] for im in images}
    if len(sizes) != len(images):
        raise ValueError("an image id appears more than once in the evaluation data")
    known_cats = {int(c["id"]) for c in categories}
    for i, res in enumerate(results):
        if int(res["image_id"]) not in sizes:
            raise ValueError(f"entry {i}: image_id {res['image_id']} is not in the data")
        if int(res["category_id"]) not in known_cats:
            raise ValueError(f"entry {i}: unknown category_id {res['category_id']}")
        size = [int(v) for v in res["segmentation"]["size"]]
        if size != sizes[int(res["image_id"])]:
            raise ValueError(f"entry {i}: mask size {size} differs from image "
                             f"{res['image_id']}'s {sizes[int(res['image_id'])]} (height, width)")  # fmt: skip
    gt = COCO()
    gt.dataset = {
        "images": [dict(im) for im in images],
        "annotations": [{**a, "id": i + 1} for i, a in enumerate(annotations)],
        "categories": [
            {"id": int(c["id"]), "name": str(c.get("name", c["id"]))} for c in categories
        ],
    }
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # pycocotools vs numpy 2
        gt.createIndex()
        if not results:
            empty = dict.fromkeys(METRIC_KEYS, 0.0 if annotations else -1.0)
            if per_class:
                for prefix in ("segm", "bbox"):
                    empty.update(empty_detail(prefix, categories, annotations))
            return empty
        segm = [{k: v for k, v in r.items() if k not in ("bbox", "area")} for r in results]
        boxes = [{k: v for k, v in r.items() if k not in ("segmentation", "area")} for r in results]
        from pycocotools import mask as mask_utils

        for box, res in zip(boxes, results, strict=True):
            if "bbox" not in box:
                rle = dict(res["segmentation"], counts=res["segmentation"]["counts"].encode())
                box["bbox"] = [float(v) for v in mask_utils.toBbox(rle)]
        return {**_run_cocoeval(gt, segm, "segm", categories, per_class),
                **_run_cocoeval(gt, boxes, "bbox", categories, per_class)}  # fmt: skip


def _target_ground_truth(target: dict, categories: Sequence[dict]) -> tuple[dict, list[dict]]:
    """Loader target -> COCO image entry and annotations at ``orig_size`` (masks as RLE)."""
    height, width = (int(v) for v in target["orig_size"])
    h, w = (int(v) for v in target["size"])
    masks = to_original_size(torch.as_tensor(target["masks"]), (height, width))
    scale = np.array([width / w, height / h, width / w, height / h])
    boxes = as_numpy(target["boxes"]).astype(np.float64).reshape(-1, 4) * scale
    image_id = int(target["image_id"])
    anns = []
    for rle, box, label, crowd, mask in zip(encode_masks(masks), boxes, as_numpy(target["labels"]),
                                            as_numpy(target["iscrowd"]), masks, strict=True):  # fmt: skip
        anns.append({"image_id": image_id, "category_id": int(categories[int(label)]["id"]),
                     "segmentation": rle, "area": float(mask.sum()), "iscrowd": int(bool(crowd)),
                     "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]]})  # fmt: skip
    return {"id": image_id, "height": height, "width": width}, anns


def prediction_results(image_id: int, prediction: dict, categories: Sequence[dict]) -> list[dict]:
    """One image's prediction (``scores``, ``labels`` train ids, ``masks`` (k, H, W) bool at the
    original size, optional ``boxes`` (k, 4) xyxy) -> COCO results entries with RLE masks."""
    rles = encode_masks(prediction["masks"])
    scores = as_numpy(prediction["scores"]).tolist()
    labels = as_numpy(prediction["labels"]).tolist()
    boxes = prediction.get("boxes")
    out = []
    for i, (rle, score, label) in enumerate(zip(rles, scores, labels, strict=True)):
        entry = {"image_id": int(image_id), "category_id": int(categories[int(label)]["id"]),
                 "segmentation": rle, "score": round(float(score), 5)}  # fmt: skip
        if boxes is not None:
            x0, y0, x1, y1 = (float(v) for v in as_numpy(boxes)[i])
            entry["bbox"] = [round(x0, 3), round(y0, 3), round(x1 - x0, 3), round(y1 - y0, 3)]
        out.append(entry)
    return out


class InstanceEvaluator:
    """Accumulates ground truth and RLE results; ``compute`` runs COCOeval on rank 0.

    ``update(predictions, batch)``: see :func:`prediction_results`; ground truth from the
    targets' masks brought back to ``orig_size`` (nearest-exact) when the loader resized them.
    ``predictions_out``: rank 0 writes the COCO results JSON there in ``compute``.
    ``per_class``: also AP by size, AR@100 and the AP of each class.
    """

    def __init__(
        self, categories: Sequence[dict], predictions_out: str | os.PathLike | None = None,
        per_class: bool = False,
    ) -> None:
        self.categories = list(categories)
        self.per_class = per_class
        self.predictions_out = Path(predictions_out) if predictions_out is not None else None
        self.images: list[dict] = []
        self.annotations: list[dict] = []
        self.results: list[dict] = []

    def update(self, predictions: Sequence[dict], batch: dict) -> None:
        for _, pred, target in real_images(predictions, batch):
            image, anns = _target_ground_truth(target, self.categories)
            self.images.append(image)
            self.annotations.extend(anns)
            self.results.extend(prediction_results(image["id"], pred, self.categories))

    def compute(self) -> dict[str, float]:
        images = gather_lists(self.images)
        annotations, results = gather_lists(self.annotations), gather_lists(self.results)
        metrics = None
        if is_rank0():
            metrics = coco_instance_metrics(images, annotations, results, self.categories,
                                            per_class=self.per_class)  # fmt: skip
            metrics["num_images"] = len(images)
            if self.predictions_out is not None:
                atomic_write_bytes(self.predictions_out, (json.dumps(results) + "\n").encode())
        return dict(broadcast_from_rank0(metrics))


def build_evaluator(
    categories: Sequence[dict], predictions_out: str | os.PathLike | None = None
) -> InstanceEvaluator:
    """The instance-segmentation evaluator (segm and box AP)."""
    return InstanceEvaluator(categories, predictions_out=predictions_out)


def load_instance_results(path: str | os.PathLike) -> list[dict]:
    """Read a COCO results JSON whose entries carry RLE ``segmentation`` (errors name the file)."""
    path = Path(path)
    results = read_json_file(path, "predictions file")
    if not isinstance(results, list):
        raise ValueError(f"{path}: expected a JSON list of COCO results with RLE segmentations")
    out = []
    for i, res in enumerate(results):
        if not isinstance(res, dict) or not {"image_id", "category_id", "segmentation"} <= set(res):
            raise ValueError(f"{path}: entry {i} lacks image_id, category_id or segmentation")
        seg = res["segmentation"]
        if not (isinstance(seg, dict) and isinstance(seg.get("counts"), str)
                and isinstance(seg.get("size"), list) and len(seg["size"]) == 2):  # fmt: skip
            raise ValueError(f"{path}: entry {i}: segmentation must be a compressed RLE "
                             '{"size": [height, width], "counts": str}')  # fmt: skip
        entry = {"image_id": int(res["image_id"]), "category_id": int(res["category_id"]),
                 "segmentation": {"size": [int(v) for v in seg["size"]], "counts": seg["counts"]},
                 "score": float(res.get("score", 1.0))}  # fmt: skip
        if "bbox" in res:
            if not (isinstance(res["bbox"], list) and len(res["bbox"]) == 4):
                raise ValueError(
                    f"{path}: entry {i} has bbox {res['bbox']!r}; expected [x, y, w, h]"
                )
            entry["bbox"] = [float(v) for v in res["bbox"]]
        out.append(entry)
    return out


def score_instance_file(
    results_json: str | os.PathLike, data: str | os.PathLike, *, task: str, num_workers: int = 0,
    per_class: bool = False,
) -> dict[str, float]:
    """``cf eval --task instance --predictions FILE``: segm and box AP of a COCO results JSON.

    Ground truth is the dataset's own COCO annotations (polygons / RLE, areas, crowd flags)
    read from ``data`` (shards or a raw folder), i.e. exactly what COCOeval sees on the source.
    """
    results = load_instance_results(results_json)
    info, records = iter_label_records(data, task)
    images, annotations = [], []
    for annotation, _ in records:
        image_id = int(annotation["image_id"])
        images.append({"id": image_id, "height": int(annotation["height"]),
                       "width": int(annotation["width"])})  # fmt: skip
        for ann in annotation.get("annotations", []):
            item = {k: v for k, v in ann.items() if k != "id"}
            item["image_id"] = image_id
            item.setdefault("iscrowd", 0)
            if "area" not in item:
                item["area"] = float(ann["bbox"][2] * ann["bbox"][3])
            annotations.append(item)
    try:
        metrics = coco_instance_metrics(images, annotations, results, info["categories"],
                                        per_class=per_class)  # fmt: skip
    except ValueError as exc:
        raise ValueError(f"{results_json}: {exc} ({data})") from None
    return {**metrics, "num_images": len(images), "num_detections": len(results)}
