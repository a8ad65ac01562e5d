"""COCO box AP with pycocotools' ``COCOeval`` (bbox), the official convention.

Ground truth and detections are collected per image in ORIGINAL image coordinates and with
the dataset's ORIGINAL category ids (``categories[train_id]["id"]``), so the detections list is
a valid COCO results file. Keys (percent, 0-100): ``bbox_AP`` (IoU .50:.95), ``bbox_AP50``,
``bbox_AP75``; maxDets 100; crowd ground truth is kept with ``iscrowd=1`` and COCOeval ignores
detections matched to it. ``-1`` (COCOeval's value) means the data holds no ground-truth box.

Ground truth comes from the data pipeline's decoded samples (boxes xyxy in source pixels,
train-id labels, crowd flags, image ids) -- through the eval transform, whose pure resize is
undone with ``orig_size / size`` -- so it works for shards and raw folders alike.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from clusterformer.metrics.coco_detail import cocoeval_detail, empty_detail
from clusterformer.metrics.seg_common import atomic_write_bytes, real_images

METRIC_KEYS: tuple[str, ...] = ("bbox_AP", "bbox_AP50", "bbox_AP75")


def _xyxy_to_xywh(box: Sequence[float]) -> list[float]:
    x0, y0, x1, y1 = (float(v) for v in box)
    return [x0, y0, x1 - x0, y1 - y0]


def target_ground_truth(target: dict, categories: Sequence[dict]) -> tuple[dict, list[dict]]:
    """One loader target -> the COCO image entry and its annotations (original coordinates).

    Args:
        target: ``boxes`` (n, 4) xyxy at the transformed ``size``, ``labels`` (n,) train ids,
            ``iscrowd`` (n,), ``image_id``, ``orig_size`` (H, W), ``size`` (h, w). The eval
            transform only resizes, so ``orig / size`` maps boxes back exactly.
    """
    height, width = (int(v) for v in target["orig_size"])
    h, w = (int(v) for v in target["size"])
    scale = torch.tensor([width / w, height / h, width / w, height / h], dtype=torch.float64)
    boxes = target["boxes"].detach().to("cpu", torch.float64) * scale
    image_id = int(target["image_id"])
    crowd = target.get("iscrowd")
    anns = []
    for i, (box, label) in enumerate(zip(boxes.tolist(), target["labels"].tolist(), strict=True)):
        xywh = _xyxy_to_xywh(box)
        anns.append(
            {
                "image_id": image_id,
                "category_id": int(categories[int(label)]["id"]),
                "bbox": xywh,
                "area": xywh[2] * xywh[3],
                "iscrowd": int(bool(crowd[i])) if crowd is not None else 0,
            }
        )
    return {"id": image_id, "height": height, "width": width}, anns


def prediction_results(image_id: int, prediction: dict, categories: Sequence[dict]) -> list[dict]:
    """One image's post-processed prediction -> COCO results entries.

    Args:
        prediction: ``scores`` (k,), ``labels`` (k,) train ids, ``boxes`` (k, 4) xyxy in
            original pixels.
    """
    return [
        {
            "image_id": int(image_id),
            "category_id": int(categories[int(label)]["id"]),
            "bbox": [round(v, 3) for v in _xyxy_to_xywh(box)],
            "score": round(float(score), 5),
        }
        for box, label, score in zip(
            prediction["boxes"].tolist(),
            prediction["labels"].tolist(),
            prediction["scores"].tolist(),
            strict=True,
        )
    ]


def coco_bbox_metrics(
    images: Sequence[dict],
    annotations: Sequence[dict],
    detections: Sequence[dict],
    categories: Sequence[dict],
    per_class: bool = False,
) -> dict[str, float]:
    """Run ``COCOeval`` (bbox) and return :data:`METRIC_KEYS` in percent; with ``per_class``
    also ``bbox_APs/APm/APl/AR100`` and ``bbox_AP/<class name>``
    (:func:`~clusterformer.metrics.coco_detail.cocoeval_detail`).

    Raises:
        ValueError: duplicate image ids, or detections for an image or category the ground
            truth does not know.
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    ids = [int(im["id"]) for im in images]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise ValueError(f"image id {dup} appears more than once in the evaluation data")
    known_images, known_cats = set(ids), {int(c["id"]) for c in categories}
    for det in detections:
        if int(det["image_id"]) not in known_images:
            raise ValueError(f"detection for image_id {det['image_id']}, which is not in the data")
        if int(det["category_id"]) not in known_cats:
            raise ValueError(f"detection with unknown category_id {det['category_id']}")
    gt = COCO()
    gt.dataset = {
        "images": list(images),
        "annotations": [{**a, "id": i + 1} for i, a in enumerate(annotations)],
        "categories": [
            {"id": int(c["id"]), "name": str(c.get("name", c["id"]))} for c in categories
        ],
    }
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
        if not detections:
            empty = dict.fromkeys(METRIC_KEYS, 0.0 if annotations else -1.0)
            return {**empty, **(empty_detail("bbox", categories, annotations) if per_class else {})}
        dt = gt.loadRes([dict(d) for d in detections])
        coco_eval = COCOeval(gt, dt, iouType="bbox")
        coco_eval.params.maxDets = [1, 10, 100]
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    stats = coco_eval.stats
    out = {
        key: (float(stats[i]) * 100 if stats[i] >= 0 else -1.0) for i, key in enumerate(METRIC_KEYS)
    }
    return {**out, **(cocoeval_detail(coco_eval, "bbox", categories) if per_class else {})}


class CocoDetectionEvaluator:
    """Accumulates ground truth and detections batch by batch; ``compute`` runs COCOeval.

    ``update(predictions, batch)``: predictions is one dict per image (``scores``, ``labels``,
    ``boxes`` xyxy in original pixels), batch the loader batch (its ``targets`` give image ids,
    ground truth and sizes; entries with ``batch["valid"]`` False are evaluation padding and
    skipped). ``compute`` gathers from every rank, evaluates on rank 0 and broadcasts.
    ``detections_out``: when set, rank 0 writes the COCO results JSON there in ``compute``.
    ``per_class``: also AP by size, AR@100 and the AP of each class.
    """

    def __init__(
        self, categories: Sequence[dict], detections_out: str | os.PathLike | None = None,
        per_class: bool = False,
    ) -> None:
        self.categories = list(categories)
        self.per_class = per_class
        self.detections_out = detections_out
        self.images: list[dict] = []
        self.annotations: list[dict] = []
        self.detections: list[dict] = []

    def update(self, predictions: Sequence[dict], batch: dict) -> None:
        for _, pred, target in real_images(predictions, batch):
            image, anns = target_ground_truth(target, self.categories)
            self.images.append(image)
            self.annotations.extend(anns)
            self.detections.extend(prediction_results(image["id"], pred, self.categories))

    def _gathered(self) -> tuple[list[dict], list[dict], list[dict]]:
        dist = torch.distributed
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return self.images, self.annotations, self.detections
        parts: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(parts, (self.images, self.annotations, self.detections))
        images = [im for p in parts for im in p[0]]
        return images, [a for p in parts for a in p[1]], [d for p in parts for d in p[2]]

    def compute(self) -> dict[str, float]:
        images, annotations, detections = self._gathered()
        dist = torch.distributed
        distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        rank = dist.get_rank() if distributed else 0
        box: list[Any] = [None]
        if rank == 0:
            metrics = coco_bbox_metrics(images, annotations, detections, self.categories,
                                        per_class=self.per_class)  # fmt: skip
            metrics["num_images"] = len(images)
            if self.detections_out is not None:
                atomic_write_bytes(Path(self.detections_out), (json.dumps(detections) + "\n").encode())
            box = [metrics]
        if distributed:
            dist.broadcast_object_list(box, src=0)
        return dict(box[0])


def load_results(path: str | os.PathLike) -> list[dict]:
    """Read a COCO results JSON (a list of ``image_id``, ``category_id``, ``bbox``, ``score``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: predictions file not found")
    try:
        results = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None
    except RecursionError:
        raise ValueError(f"{path}: JSON nested too deeply to be a results file") from None
    if isinstance(results, dict) and "annotations" in results:
        results = results["annotations"]  # a COCO ground-truth file used as predictions
    if not isinstance(results, list):
        raise ValueError(f"{path}: expected a JSON list of COCO detections")
    out = []
    for i, det in enumerate(results):
        if not isinstance(det, dict) or not {"image_id", "category_id", "bbox"} <= set(det):
            raise ValueError(f"{path}: entry {i} lacks image_id, category_id or bbox")
        bbox = det["bbox"]
        if not (isinstance(bbox, list) and len(bbox) == 4):
            raise ValueError(f"{path}: entry {i} has bbox {bbox!r}; expected [x, y, width, height]")
        out.append(
            {
                "image_id": int(det["image_id"]),
                "category_id": int(det["category_id"]),
                "bbox": [float(v) for v in bbox],
                "score": float(det.get("score", 1.0)),
            }
        )
    return out


def iter_ground_truth(
    data: str | os.PathLike, *, task: str, num_workers: int = 0
) -> Iterable[tuple[dict, list[dict]]]:
    """``(image entry, annotations)`` for every sample of a COCO-format dataset (shards or raw),
    read as ``task``'s samples (boxes, labels, iscrowd)."""
    from clusterformer.data import LoaderSpec, build_loader, load_dataset_info

    categories = load_dataset_info(str(data), task)["categories"]
    # Boxes only: a small eval size keeps the resize cheap; the scale is undone exactly.
    spec = LoaderSpec(batch_size=16, image_size=64, train=False, num_workers=num_workers,
                      rank=0, world_size=1)  # fmt: skip
    loader = build_loader(str(data), task, spec)
    for batch in loader:
        for ok, target in zip(batch["valid"].tolist(), batch["targets"], strict=True):
            if ok:
                yield target_ground_truth(target, categories)


def score_detection_file(
    predictions: str | os.PathLike, data: str | os.PathLike, *, task: str, num_workers: int = 0,
    per_class: bool = False,
) -> dict[str, float]:
    """``cf eval --task detection --predictions FILE --data DIR``: COCO box AP of a results file
    against ``data`` read as ``task``'s samples.

    ``predictions`` is a COCO results JSON (original image ids, category ids, xywh boxes in
    original pixels); a COCO ground-truth file (with "annotations") also works, scoring its
    annotations with score 1.
    """
    from clusterformer.data import load_dataset_info

    results = load_results(predictions)
    categories = load_dataset_info(str(data), task)["categories"]
    images, annotations = [], []
    for image, anns in iter_ground_truth(data, task=task, num_workers=num_workers):
        images.append(image)
        annotations.extend(anns)
    try:
        metrics = coco_bbox_metrics(images, annotations, results, categories, per_class=per_class)
    except ValueError as exc:
        raise ValueError(f"{predictions}: {exc} ({data})") from None
    return {**metrics, "num_images": len(images), "num_detections": len(results)}
