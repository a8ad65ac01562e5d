"""Object detection: set-matching criterion, top-100 post-processing, COCO box AP.

Targets. ``batch["targets"][i]`` holds ``boxes`` (n, 4) xyxy in the transformed image's pixels,
``labels`` (n,) train ids, ``iscrowd`` (n,) and ``size`` (h, w) before padding. Training targets
are the non-crowd boxes as cxcywh divided by ``size`` -- the frame the model predicts in (each
image's real, unpadded extent), so padding and batch composition never change a target.

Criterion (Deformable-DETR / DINO, :class:`~clusterformer.tasks.criterion.BoxCriterion`): per
output set (final layer, every earlier layer and the encoder proposals) a Hungarian matching
on ``2 * focal + 5 * L1 + 2 * GIoU`` cost, then the same weighted losses.

Post-processing: the top-100 (query, class) pairs by sigmoid score per image; boxes scaled by
``orig_size`` (predictions are fractions of the real image, and the eval transform only resizes)
and clipped to the image.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from clusterformer.data.sample_spec import SampleSpec
from clusterformer.metrics.coco import METRIC_KEYS, score_detection_file
from clusterformer.ops.boxes import box_cxcywh_to_xyxy, box_iou, box_xyxy_to_cxcywh
from clusterformer.tasks.criterion import BoxCriterion, SetOptions
from clusterformer.tasks.predictions import detections
from clusterformer.tasks.registry import register_task
from clusterformer.tasks.spec import Batch, ExportHeads, Task, TaskSpec, option

DETECTION_TOP_K = 100
# TTA merges the passes' boxes by class-aware NMS at this IoU (mmdetection's DetTTAModel
# default), rather than weighted box fusion: the kept boxes are real predictions and scores
# stay calibrated as a single pass's.
TTA_NMS_IOU = 0.5


def normalised_targets(batch: Batch, device: torch.device) -> list[dict[str, Tensor]]:
    """Per image: non-crowd ``labels`` (n,) and ``boxes`` (n, 4) cxcywh in ``[0, 1]`` of ``size``."""
    out = []
    for target in batch["targets"]:
        h, w = (float(v) for v in target["size"])
        boxes = target["boxes"].to(device, torch.float32)
        labels = target["labels"].to(device, torch.int64)
        crowd = target.get("iscrowd")
        if crowd is not None:
            keep = ~crowd.to(device, torch.bool)
            boxes, labels = boxes[keep], labels[keep]
        scale = torch.tensor([w, h, w, h], device=device)
        out.append({"labels": labels, "boxes": box_xyxy_to_cxcywh(boxes / scale).clamp(0, 1)})
    return out


def top_detections(pred_logits: Tensor, pred_boxes: Tensor,
                   top_k: int) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """The top-``k`` (query, class) pairs by sigmoid score: ``scores (B, k)``, ``labels (B, k)``
    and their queries' boxes ``(B, k, 4)`` (cxcywh, float32); ``k = min(top_k, Q * C)``."""
    _, queries, classes = pred_logits.shape
    prob = pred_logits.float().sigmoid().flatten(1)
    scores, index = prob.topk(min(top_k, queries * classes), dim=1)
    query, labels = index // classes, index % classes
    return scores, labels, pred_boxes.float().gather(1, query.unsqueeze(-1).expand(-1, -1, 4))


def postprocess_detections(
    pred_logits: Tensor,
    pred_boxes: Tensor,
    orig_sizes: list[tuple[int, int]],
    *,
    top_k: int = 100,
) -> list[dict[str, Tensor]]:
    """Top-``k`` (query, class) pairs per image, boxes in original pixels.

    Args:
        pred_logits: ``(B, Q, C)``; pred_boxes: ``(B, Q, 4)`` cxcywh in ``[0, 1]`` of the real
            image; orig_sizes: ``(H, W)`` per image.

    Returns:
        per image ``scores`` (k,), ``labels`` (k,) train ids, ``boxes`` (k, 4) xyxy float32 in
        original pixels, clipped to the image; ``k = min(top_k, Q * C)``, best first.
    """
    scores, labels, picked = top_detections(pred_logits, pred_boxes, top_k)
    boxes = box_cxcywh_to_xyxy(picked)
    out = []
    for i, (height, width) in enumerate(orig_sizes):
        scale = torch.tensor(
            [width, height, width, height], dtype=torch.float32, device=boxes.device
        )
        b = torch.minimum((boxes[i] * scale).clamp_min(0), scale)
        out.append({"scores": scores[i].cpu(), "labels": labels[i].cpu(), "boxes": b.cpu()})
    return out


def class_aware_nms(boxes: Tensor, scores: Tensor, labels: Tensor, iou_threshold: float) -> Tensor:
    """Greedy non-maximum suppression within each class.

    Args:
        boxes: ``(n, 4)`` xyxy; scores, labels: ``(n,)``.

    Returns:
        ``(m,)`` int64 indices of the kept boxes, best score first: a box is dropped when a
        higher-scoring kept box of its class overlaps it by IoU > ``iou_threshold``.
    """
    order = scores.argsort(descending=True, stable=True)
    overlap = box_iou(boxes[order].float(), boxes[order].float()) > iou_threshold
    overlap &= labels[order].view(-1, 1) == labels[order].view(1, -1)
    suppress = overlap.cpu().numpy()
    alive = np.ones(len(order), dtype=bool)
    for i in range(len(order)):
        if alive[i]:
            alive[i + 1:] &= ~suppress[i, i + 1:]
    return order[torch.from_numpy(alive).to(order.device)]


@dataclass
class DetectionOptions(SetOptions):
    """The box criterion's weights (its matching cost uses the same ones)."""

    l1_weight: float = option(5.0, "L1 box loss (and cost) weight")
    giou_weight: float = option(2.0, "GIoU box loss (and cost) weight")
    focal_alpha: float = option(0.25, "focal loss alpha")
    focal_gamma: float = option(2.0, "focal loss gamma")


class DetectionTask(Task):
    """COCO-style object detection with the ClusterFormer detector."""

    def __init__(self, spec: TaskSpec, categories: list[dict], options: DetectionOptions) -> None:
        super().__init__(spec, categories, options)
        self.criterion = BoxCriterion(
            self.num_classes, class_weight=options.class_weight, l1_weight=options.l1_weight,
            giou_weight=options.giou_weight, focal_alpha=options.focal_alpha,
            focal_gamma=options.focal_gamma,
        )

    def loss(self, outputs: Any, batch: Batch) -> tuple[Tensor, dict[str, float]]:
        return self.criterion(outputs, normalised_targets(batch, outputs["pred_logits"].device))

    def postprocess(self, outputs: Any, batch: Batch) -> list[dict[str, Tensor]]:
        sizes = [tuple(int(v) for v in t["orig_size"]) for t in batch["targets"]]
        return postprocess_detections(
            outputs["pred_logits"], outputs["pred_boxes"], sizes, top_k=self.options.top_k
        )

    # TTA: a view is an image's top-k detections in original pixels; views are concatenated,
    # then class-aware NMS keeps the best top_k.
    def view_scores(self, outputs: Any, batch: Batch) -> list[dict[str, Tensor]]:
        return self.postprocess(outputs, batch)

    def unflip_view(self, view: dict[str, Tensor], orig_size: tuple[int, int] | None) -> dict[str, Tensor]:
        assert orig_size is not None, "detection batches carry each image's orig_size"
        x0, y0, x1, y1 = view["boxes"].unbind(-1)
        width = float(orig_size[1])
        return {**view, "boxes": torch.stack([width - x1, y0, width - x0, y1], -1)}

    def combine_views(self, a: dict[str, Tensor], b: dict[str, Tensor]) -> dict[str, Tensor]:
        return {k: torch.cat([a[k], b[k]]) for k in ("scores", "labels", "boxes")}

    def finish_views(self, combined: list[dict[str, Tensor]], count: int) -> list[dict[str, Tensor]]:
        out = []
        for dets in combined:
            keep = class_aware_nms(dets["boxes"], dets["scores"], dets["labels"], TTA_NMS_IOU)
            keep = keep[: self.options.top_k]
            out.append({k: dets[k][keep] for k in ("scores", "labels", "boxes")})
        return out

    def evaluator(self, predictions_out: Path | str | None = None, per_class: bool = False) -> Any:
        from clusterformer.metrics.coco import CocoDetectionEvaluator

        return CocoDetectionEvaluator(self.categories, detections_out=predictions_out,
                                      per_class=per_class)  # fmt: skip


def detection_topk(raw: tuple[Tensor, ...], images: Tensor,
                   top_k: int = DETECTION_TOP_K) -> tuple[Tensor, ...]:  # fmt: skip
    """The exported graph's post-processing: sigmoid scores, top-``k`` over queries x classes,
    xyxy boxes in input pixels (what ``cf predict`` keeps, before the resize back).

    Args:
        raw: ``pred_logits (B, Q, C)``, ``pred_boxes (B, Q, 4)`` cxcywh in ``[0, 1]``.
        images: ``(B, 3, H, W)``: only its size is used (boxes are scaled to it).

    Returns:
        ``scores (B, k)``, ``labels (B, k)`` int64, ``boxes (B, k, 4)`` xyxy float32.
    """
    scores, labels, picked = top_detections(*raw, top_k)
    cx, cy, w, h = picked.unbind(-1)
    # The size as a tensor computed from the input (not a Python number), so the graph stays
    # dynamic in H and W under torch.export and ONNX.
    height = torch.ones_like(images[0, 0, :, 0]).sum()
    width = torch.ones_like(images[0, 0, 0, :]).sum()
    x0 = torch.minimum(((cx - 0.5 * w) * width).clamp_min(0), width)
    y0 = torch.minimum(((cy - 0.5 * h) * height).clamp_min(0), height)
    x1 = torch.minimum(((cx + 0.5 * w) * width).clamp_min(0), width)
    y1 = torch.minimum(((cy + 0.5 * h) * height).clamp_min(0), height)
    return scores, labels, torch.stack([x0, y0, x1, y1], -1)


SPEC = register_task(TaskSpec(
    name="detection",
    summary="boxes (COCO instances JSON); COCO box AP",
    primary_metric=METRIC_KEYS[0],
    metric_keys=METRIC_KEYS,
    data=SampleSpec(formats=("coco",), fields=("boxes", "labels", "iscrowd")),
    architecture="detector",
    options=DetectionOptions,
    runtime=DetectionTask,
    export=ExportHeads(("pred_logits", "pred_boxes"), ("pred_logits", "pred_boxes"),
                       detection_topk, ("scores", "labels", "boxes")),
    describe=detections,
    score_file=score_detection_file,
    prediction_suffix=".detections.json",
    test_time=frozenset({"tta"}),
))
