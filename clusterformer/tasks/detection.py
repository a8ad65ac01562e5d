"""Object detection: set-matching criterion, top-100 post-processing, COCO box AP.

Targets. ``batch["targets"][i]`` holds ``boxes`` (n, 4) xyxy in the transformed image's pixels,
``labels`` (n,) train ids, ``iscrowd`` (n,) and ``size`` (h, w) before padding. Training targets
are the non-crowd boxes as cxcywh divided by ``size`` -- the frame the model predicts in (each
image's real, unpadded extent), so padding and batch composition never change a target.

Criterion (Deformable-DETR / DINO): per output set (final layer, every earlier layer and the
encoder proposals) a Hungarian matching on ``2 * focal + 5 * L1 + 2 * GIoU`` cost, then
``2 * focal + 5 * L1 + 2 * GIoU`` losses. Every term is summed and divided by the number of
target boxes averaged over ranks (all-reduced when torch.distributed is initialised), so each
rank's gradient is its share of the global mean.

Post-processing: the top-100 (query, class) pairs by sigmoid score per image; boxes scaled by
``orig_size`` (predictions are fractions of the real image, and the eval transform only resizes)
and clipped to the image.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from clusterformer.metrics.coco import CocoDetectionEvaluator
from clusterformer.ops.boxes import box_cxcywh_to_xyxy, box_xyxy_to_cxcywh
from clusterformer.ops.losses import (
    giou_box_loss,
    l1_box_loss,
    one_hot_targets,
    sigmoid_focal_loss,
)
from clusterformer.ops.matching import detection_cost, hungarian_match
from clusterformer.tasks.base import Batch, Task


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


def global_num_boxes(count: int, device: torch.device) -> float:
    """Target boxes per rank averaged over ranks (DETR's normaliser), at least 1."""
    total = torch.tensor(float(count), device=device)
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(total)
        total = total / dist.get_world_size()
    return max(float(total), 1.0)


class SetCriterion:
    """Hungarian-matched focal + L1 + GIoU losses over every output set.

    Args:
        num_classes: ``C``. class_weight, l1_weight, giou_weight: loss (and cost) weights.
        focal_alpha, focal_gamma: the focal loss shape.
    """

    def __init__(
        self,
        num_classes: int,
        *,
        class_weight: float = 2.0,
        l1_weight: float = 5.0,
        giou_weight: float = 2.0,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
    ) -> None:
        self.num_classes = num_classes
        self.weights = {"class": class_weight, "l1": l1_weight, "giou": giou_weight}
        self.alpha, self.gamma = focal_alpha, focal_gamma

    def match(
        self, output: dict[str, Tensor], targets: list[dict[str, Tensor]]
    ) -> list[tuple[Tensor, Tensor]]:
        """Per image ``(query indices, target indices)`` of the minimum-cost assignment."""
        sizes = [len(t["labels"]) for t in targets]
        logits = output["pred_logits"]
        if sum(sizes) == 0:
            empty = torch.zeros(0, dtype=torch.int64)
            return [(empty, empty) for _ in sizes]
        with torch.no_grad():
            cost = detection_cost(
                logits.detach(),
                output["pred_boxes"].detach(),
                torch.cat([t["labels"] for t in targets]),
                torch.cat([t["boxes"] for t in targets]),
                class_weight=self.weights["class"],
                l1_weight=self.weights["l1"],
                giou_weight=self.weights["giou"],
                alpha=self.alpha,
                gamma=self.gamma,
            )
        return hungarian_match(cost, sizes)

    def set_losses(
        self, output: dict[str, Tensor], targets: list[dict[str, Tensor]], num_boxes: float
    ) -> dict[str, Tensor]:
        """Unweighted ``class``, ``l1``, ``giou`` losses of one output set (each / num_boxes)."""
        logits, boxes = output["pred_logits"], output["pred_boxes"]
        indices = self.match(output, targets)
        device = logits.device
        batch_idx = torch.cat([torch.full_like(q, i) for i, (q, _) in enumerate(indices)]).to(
            device
        )
        query_idx = torch.cat([q for q, _ in indices]).to(device)
        labels = torch.full(logits.shape[:2], self.num_classes, dtype=torch.int64, device=device)
        matched_labels = torch.cat(
            [t["labels"][j.to(device)] for t, (_, j) in zip(targets, indices, strict=True)]
        )
        matched_boxes = torch.cat(
            [t["boxes"][j.to(device)] for t, (_, j) in zip(targets, indices, strict=True)]
        )
        labels = labels.index_put((batch_idx, query_idx), matched_labels)
        onehot = one_hot_targets(labels, self.num_classes, dtype=torch.float32)
        focal = sigmoid_focal_loss(logits.float(), onehot, alpha=self.alpha, gamma=self.gamma)
        pred = boxes.float()[batch_idx, query_idx]
        return {
            "class": focal.sum() / num_boxes,
            "l1": l1_box_loss(pred, matched_boxes).sum() / num_boxes,
            "giou": giou_box_loss(pred, matched_boxes).sum() / num_boxes,
        }

    def __call__(
        self, outputs: dict[str, Any], targets: list[dict[str, Tensor]]
    ) -> tuple[Tensor, dict[str, float]]:
        device = outputs["pred_logits"].device
        num_boxes = global_num_boxes(sum(len(t["labels"]) for t in targets), device)
        sets = [("", outputs)] + [
            (f"_{i}", aux) for i, aux in enumerate(outputs.get("aux_outputs", []))
        ]
        if "enc_outputs" in outputs:
            sets.append(("_enc", outputs["enc_outputs"]))
        total = outputs["pred_logits"].new_zeros((), dtype=torch.float32)
        scalars: dict[str, float] = {}
        for suffix, output in sets:
            losses = self.set_losses(output, targets, num_boxes)
            for name, value in losses.items():
                total = total + self.weights[name] * value
                if suffix in ("", "_enc"):
                    scalars[f"loss_{name}{suffix}"] = float(value.detach())
        scalars["loss"] = float(total.detach())
        return total, scalars


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
    batch, queries, classes = pred_logits.shape
    prob = pred_logits.float().sigmoid().flatten(1)
    scores, index = prob.topk(min(top_k, queries * classes), dim=1)
    query, labels = index // classes, index % classes
    boxes = box_cxcywh_to_xyxy(pred_boxes.float().gather(1, query.unsqueeze(-1).expand(-1, -1, 4)))
    out = []
    for i, (height, width) in enumerate(orig_sizes):
        scale = torch.tensor(
            [width, height, width, height], dtype=torch.float32, device=boxes.device
        )
        b = torch.minimum((boxes[i] * scale).clamp_min(0), scale)
        out.append({"scores": scores[i].cpu(), "labels": labels[i].cpu(), "boxes": b.cpu()})
    return out


class DetectionTask(Task):
    """COCO-style object detection with the ClusterFormer detector.

    Args:
        class_weight, l1_weight, giou_weight: cost and loss weights (2, 5, 2).
        focal_alpha, focal_gamma: sigmoid focal loss shape (0.25, 2).
        top_k: detections kept per image (100, COCO's maxDets).
        detections_out: when set, evaluation writes the COCO results JSON there.
    """

    name = "detection"
    primary_metric = "bbox_AP"

    def __init__(
        self,
        *,
        class_weight: float = 2.0,
        l1_weight: float = 5.0,
        giou_weight: float = 2.0,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        top_k: int = 100,
        detections_out: str | None = None,
        num_classes: int | None = None,
    ) -> None:
        self.options = {
            "class_weight": class_weight,
            "l1_weight": l1_weight,
            "giou_weight": giou_weight,
            "focal_alpha": focal_alpha,
            "focal_gamma": focal_gamma,
            "top_k": top_k,
        }
        self.top_k = top_k
        self.detections_out = detections_out
        self.num_classes = num_classes
        self.criterion = (
            SetCriterion(
                num_classes,
                class_weight=class_weight,
                l1_weight=l1_weight,
                giou_weight=giou_weight,
                focal_alpha=focal_alpha,
                focal_gamma=focal_gamma,
            )
            if num_classes is not None
            else None
        )

    def build_model(self, preset: str, num_classes: int, **overrides: Any) -> nn.Module:
        from clusterformer.models import create_model

        self._set_classes(num_classes)
        return create_model(preset, task="detection", num_classes=num_classes, **overrides)

    def _set_classes(self, num_classes: int) -> SetCriterion:
        if self.criterion is None or self.num_classes != num_classes:
            self.num_classes = num_classes
            weights = {
                k: self.options[k]
                for k in ("class_weight", "l1_weight", "giou_weight", "focal_alpha", "focal_gamma")
            }
            self.criterion = SetCriterion(num_classes, **weights)
        return self.criterion

    def loss(self, outputs: Any, batch: Batch) -> tuple[Tensor, dict[str, float]]:
        criterion = self._set_classes(outputs["pred_logits"].shape[-1])
        return criterion(outputs, normalised_targets(batch, outputs["pred_logits"].device))

    def postprocess(self, outputs: Any, batch: Batch) -> list[dict[str, Tensor]]:
        sizes = [tuple(int(v) for v in t["orig_size"]) for t in batch["targets"]]
        return postprocess_detections(
            outputs["pred_logits"], outputs["pred_boxes"], sizes, top_k=self.top_k
        )

    def evaluator(
        self, num_classes: int, categories: list[dict] | None = None
    ) -> CocoDetectionEvaluator:
        if categories is None:
            raise ValueError("detection evaluation needs the dataset's categories (original ids)")
        if len(categories) != num_classes:
            raise ValueError(f"{len(categories)} categories for a {num_classes}-class model")
        return CocoDetectionEvaluator(categories, detections_out=self.detections_out)

    def config(self) -> dict[str, Any]:
        return dict(self.options)
