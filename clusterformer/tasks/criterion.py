"""The set criterion of the dense tasks: Hungarian matching, weighted losses, deep supervision.

:class:`SetCriterion` holds what detection and segmentation share: for every output set (the
final layer, every earlier layer and the encoder-selected centers) match predictions to targets,
compute the unweighted losses of the set, and add them up with the weights (the same weights
weigh the matching cost). Every loss is divided by the number of targets averaged over ranks
(all-reduced when torch.distributed is initialised), so each rank's gradient is its share of
the global mean. Only the final and the encoder sets' losses are logged.

* :class:`BoxCriterion` (detection, Deformable-DETR / DINO): ``2 * focal + 5 * L1 + 2 * GIoU``.
* :class:`MaskCriterion` (segmentation, Mask2Former): ``2 * CE`` (no-object class weighted
  0.1) ``+ 5 * BCE + 5 * dice``, the mask terms on sampled points (see the class).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from clusterformer.ops.losses import (
    dice_loss,
    giou_box_loss,
    l1_box_loss,
    one_hot_targets,
    sigmoid_bce_loss,
    sigmoid_focal_loss,
)
from clusterformer.ops.matching import detection_cost, hungarian_match
from clusterformer.ops.points import importance_points, point_sample, uniform_points
from clusterformer.tasks.spec import option


@dataclass
class SetOptions:
    """Options every set-matching task has (its own add the other loss weights)."""

    class_weight: float = option(2.0, "class loss (and matching cost) weight")
    top_k: int = option(100, "detections / instances kept per image (COCO's maxDets)")


Targets = list[dict[str, Tensor]]
Indices = list[tuple[Tensor, Tensor]]


def global_num_targets(count: int, device: torch.device) -> float:
    """Targets per rank averaged over ranks (DETR's normaliser), at least 1."""
    total = torch.tensor(float(count), device=device)
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(total)
        total = total / dist.get_world_size()
    return max(float(total), 1.0)


def matched_labels(indices: Indices, targets: Targets, shape: tuple[int, int], no_object: int,
                   device: torch.device) -> Tensor:  # fmt: skip
    """``(B, Q)`` int64: each matched query's target label, ``no_object`` elsewhere."""
    labels = torch.full(shape, no_object, dtype=torch.int64, device=device)
    for b, ((q, t), target) in enumerate(zip(indices, targets, strict=True)):
        labels[b, q.to(device)] = target["labels"][t.to(device)]
    return labels


class SetCriterion:
    """Matching + weighted losses over every output set; subclasses say how one set is
    matched (:meth:`match`) and what its losses are (:meth:`set_losses`).

    Args:
        num_classes: ``C``. weights: loss name -> weight (also the matching cost's weights).
    """

    def __init__(self, num_classes: int, weights: dict[str, float]) -> None:
        self.num_classes = num_classes
        self.weights = dict(weights)

    def match(self, output: dict[str, Tensor], targets: Targets, context: Any) -> Indices:
        """Per image ``(query indices, target indices)`` of the minimum-cost assignment."""
        raise NotImplementedError

    def set_losses(self, output: dict[str, Tensor], targets: Targets, context: Any,
                   num_targets: float) -> dict[str, Tensor]:  # fmt: skip
        """The unweighted losses of one output set, each divided by ``num_targets`` where it is
        a sum over matched pairs."""
        raise NotImplementedError

    def __call__(self, outputs: dict[str, Any], targets: Targets,
                 context: Any = None) -> tuple[Tensor, dict[str, float]]:  # fmt: skip
        """The weighted total over every output set, and the scalars to log."""
        device = outputs["pred_logits"].device
        num_targets = global_num_targets(sum(len(t["labels"]) for t in targets), device)
        sets = [("", outputs)] + [(f"_{i}", a) for i, a in enumerate(outputs.get("aux_outputs", []))]
        if "enc_outputs" in outputs:
            sets.append(("_enc", outputs["enc_outputs"]))
        total = outputs["pred_logits"].new_zeros((), dtype=torch.float32)
        scalars: dict[str, float] = {}
        for suffix, output in sets:
            for name, value in self.set_losses(output, targets, context, num_targets).items():
                total = total + self.weights[name] * value
                if suffix in ("", "_enc"):
                    scalars[f"loss_{name}{suffix}"] = float(value.detach())
        scalars["loss"] = float(total.detach())
        return total, scalars


class BoxCriterion(SetCriterion):
    """Focal class loss (sigmoid, no no-object column), L1 and GIoU box losses.

    Targets per image: ``labels`` (n,), ``boxes`` (n, 4) cxcywh in ``[0, 1]``.
    """

    def __init__(self, num_classes: int, *, class_weight: float = 2.0, l1_weight: float = 5.0,
                 giou_weight: float = 2.0, focal_alpha: float = 0.25,
                 focal_gamma: float = 2.0) -> None:  # fmt: skip
        super().__init__(num_classes, {"class": class_weight, "l1": l1_weight, "giou": giou_weight})
        self.alpha, self.gamma = focal_alpha, focal_gamma

    def match(self, output: dict[str, Tensor], targets: Targets, context: Any = None) -> Indices:
        sizes = [len(t["labels"]) for t in targets]
        if sum(sizes) == 0:
            empty = torch.zeros(0, dtype=torch.int64)
            return [(empty, empty) for _ in sizes]
        with torch.no_grad():
            cost = detection_cost(
                output["pred_logits"].detach(), output["pred_boxes"].detach(),
                torch.cat([t["labels"] for t in targets]), torch.cat([t["boxes"] for t in targets]),
                class_weight=self.weights["class"], l1_weight=self.weights["l1"],
                giou_weight=self.weights["giou"], alpha=self.alpha, gamma=self.gamma,
            )
        return hungarian_match(cost, sizes)

    def set_losses(self, output: dict[str, Tensor], targets: Targets, context: Any,
                   num_targets: float) -> dict[str, Tensor]:  # fmt: skip
        logits, boxes = output["pred_logits"], output["pred_boxes"]
        device = logits.device
        indices = self.match(output, targets)
        batch_idx = torch.cat([torch.full_like(q, i) for i, (q, _) in enumerate(indices)]).to(device)
        query_idx = torch.cat([q for q, _ in indices]).to(device)
        matched_boxes = torch.cat(
            [t["boxes"][j.to(device)] for t, (_, j) in zip(targets, indices, strict=True)]
        )
        labels = matched_labels(indices, targets, logits.shape[:2], self.num_classes, device)
        onehot = one_hot_targets(labels, self.num_classes, dtype=torch.float32)
        focal = sigmoid_focal_loss(logits.float(), onehot, alpha=self.alpha, gamma=self.gamma)
        pred = boxes.float()[batch_idx, query_idx]
        return {
            "class": focal.sum() / num_targets,
            "l1": l1_box_loss(pred, matched_boxes).sum() / num_targets,
            "giou": giou_box_loss(pred, matched_boxes).sum() / num_targets,
        }


def pairwise_sigmoid_ce(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean BCE of every prediction against every target: ``(Q, P)``, ``(T, P)`` -> ``(Q, T)``."""
    pos = F.binary_cross_entropy_with_logits(logits, torch.ones_like(logits), reduction="none")
    neg = F.binary_cross_entropy_with_logits(logits, torch.zeros_like(logits), reduction="none")
    return (pos @ targets.T + neg @ (1 - targets).T) / logits.shape[-1]


def pairwise_dice(logits: Tensor, targets: Tensor) -> Tensor:
    """Dice loss of every prediction against every target: ``(Q, P)``, ``(T, P)`` -> ``(Q, T)``."""
    prob = logits.sigmoid()
    numerator = 2 * prob @ targets.T
    denominator = prob.sum(-1, keepdim=True) + targets.sum(-1).unsqueeze(0)
    return 1 - (numerator + 1) / (denominator + 1)


class MaskCriterion(SetCriterion):
    """Softmax class loss (last column = no object) and mask BCE + dice on sampled points.

    Matching cost ``2 * (-p(class)) + 5 * BCE + 5 * dice``, the mask terms on ``P`` uniform
    random points shared by every prediction and target of the image, in float32 with autocast
    off. Losses: the mask terms on ``P`` importance-sampled points per matched mask (oversample
    3, importance ratio 0.75, uncertainty ``-|logit|``).

    Targets per image: ``labels`` (n,), ``masks`` (n, h, w) bool at the image's real size.
    ``context`` is the ``(B, 2)`` ``(sx, sy)`` share of the padded stride-4 grid each real
    image covers: points are drawn in ``[0, 1]`` of the real image and read from the padded
    predictions at ``point * scale``, so padding never changes a target. Target masks are read
    with border replication (they cover exactly the image), so a mask touching the border is
    not faded to 0.5 along it.

    Args:
        num_classes: ``C`` (logits have ``C + 1`` columns). class_weight, mask_weight,
            dice_weight: loss and cost weights (2, 5, 5). no_object_weight: CE weight of the
            no-object class (0.1). num_points: ``P`` (12544). oversample_ratio,
            importance_sample_ratio: importance sampling (3, 0.75).
    """

    def __init__(
        self, num_classes: int, *, class_weight: float = 2.0, mask_weight: float = 5.0,
        dice_weight: float = 5.0, no_object_weight: float = 0.1, num_points: int = 12544,
        oversample_ratio: float = 3.0, importance_sample_ratio: float = 0.75,
    ) -> None:
        super().__init__(num_classes, {"class": class_weight, "mask": mask_weight,
                                       "dice": dice_weight})  # fmt: skip
        self.no_object_weight = no_object_weight
        self.num_points = num_points
        self.oversample_ratio, self.importance_sample_ratio = oversample_ratio, importance_sample_ratio

    def match(self, output: dict[str, Tensor], targets: Targets, context: Tensor) -> Indices:
        logits, masks, scales = output["pred_logits"], output["pred_masks"], context
        indices = []
        with torch.no_grad(), torch.autocast(logits.device.type, enabled=False):
            for b, target in enumerate(targets):
                count = len(target["labels"])
                if count == 0:
                    empty = torch.zeros(0, dtype=torch.int64)
                    indices.append((empty, empty))
                    continue
                cost_class = -logits[b].float().softmax(-1)[:, target["labels"]]
                points = uniform_points(1, self.num_points, device=logits.device)
                tgt = point_sample(target["masks"].unsqueeze(0).float(), points, padding_mode="border")[0]
                pred = point_sample(masks[b].unsqueeze(0).float(), points * scales[b])[0]
                cost = (self.weights["class"] * cost_class
                        + self.weights["mask"] * pairwise_sigmoid_ce(pred, tgt)
                        + self.weights["dice"] * pairwise_dice(pred, tgt))
                indices.append(hungarian_match(cost.unsqueeze(0), [count])[0])
        return indices

    def set_losses(self, output: dict[str, Tensor], targets: Targets, context: Tensor,
                   num_targets: float) -> dict[str, Tensor]:  # fmt: skip
        logits, masks, scales = output["pred_logits"].float(), output["pred_masks"], context
        device = logits.device
        indices = self.match(output, targets, scales)
        labels = matched_labels(indices, targets, logits.shape[:2], self.num_classes, device)
        weight = torch.ones(self.num_classes + 1, device=device)
        weight[-1] = self.no_object_weight
        loss_class = F.cross_entropy(logits.transpose(1, 2), labels, weight=weight)
        point_logits, point_labels = [], []
        for b, ((q, t), target) in enumerate(zip(indices, targets, strict=True)):
            if len(q) == 0:
                continue
            src = masks[b, q.to(device)].unsqueeze(1).float()  # (M, 1, H4, W4)
            scale = scales[b].expand(len(q), 2)
            with torch.no_grad():
                coords = importance_points(
                    src, self.num_points, oversample_ratio=self.oversample_ratio,
                    importance_sample_ratio=self.importance_sample_ratio, scale=scale,
                )
                tgt = target["masks"][t.to(device)].unsqueeze(1).float()
                point_labels.append(point_sample(tgt, coords, padding_mode="border")[:, 0])
            point_logits.append(point_sample(src, coords * scale.unsqueeze(1))[:, 0])
        if not point_logits:
            zero = masks.sum() * 0.0
            return {"class": loss_class, "mask": zero, "dice": zero}
        pl, lab = torch.cat(point_logits), torch.cat(point_labels)
        return {
            "class": loss_class,
            "mask": sigmoid_bce_loss(pl, lab).sum() / num_targets,
            "dice": dice_loss(pl, lab).sum() / num_targets,
        }
