"""Instance, semantic and panoptic segmentation by mask classification (Mask2Former's recipe).

Targets (per image, at the transformed, unpadded ``size``): a set of binary masks with train-id
labels -- instance: the non-crowd instance masks; panoptic: the non-crowd segments (things and
stuff); semantic: one mask per class present (255 = ignore belongs to no mask).

Criterion, per output set (final layer, every earlier layer, the encoder-selected centers):

* Hungarian matching on ``2 * (-p(class)) + 5 * BCE + 5 * dice``, the mask terms on ``P``
  uniform random points shared by every prediction and target of the image; computed in
  float32 with autocast off.
* Losses ``2 * CE`` (no-object class weighted 0.1) ``+ 5 * BCE + 5 * dice``, the mask terms on
  ``P`` importance-sampled points per matched mask (oversample 3, importance ratio 0.75,
  uncertainty ``-|logit|``), normalised by the number of target masks averaged over ranks.

Points are drawn in ``[0, 1]`` of each image's REAL extent and read from the padded stride-4
predictions at ``point * (h, w) / (4 * H4, 4 * W4)``, so padding never changes a target.
Target masks are read with border replication (they cover exactly the image), so a mask that
touches the image border is not faded to 0.5 along it.
Inference: :mod:`clusterformer.tasks.seg_inference`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from clusterformer.ops.losses import dice_loss, sigmoid_bce_loss
from clusterformer.ops.matching import hungarian_match
from clusterformer.ops.points import importance_points, point_sample, uniform_points
from clusterformer.tasks.base import Batch, Task
from clusterformer.tasks.detection import global_num_boxes
from clusterformer.tasks.seg_inference import (
    instance_inference,
    masks_to_original,
    panoptic_inference,
    semantic_inference,
)

SEGMENTATION_TASKS: tuple[str, ...] = ("instance", "semantic", "panoptic")
PRIMARY_METRICS = {"instance": "segm_AP", "semantic": "mIoU", "panoptic": "PQ"}
IGNORE_INDEX = 255


def mask_targets(batch: Batch, task: str, device: torch.device) -> list[dict[str, Tensor]]:
    """Per image ``labels`` (n,) int64 and ``masks`` (n, h, w) bool at the image's ``size``."""
    out = []
    for target in batch["targets"]:
        if task == "semantic":
            semantic = target["semantic"].to(device)
            labels = torch.unique(semantic)
            labels = labels[labels != IGNORE_INDEX]
            masks = semantic.unsqueeze(0) == labels.view(-1, 1, 1)
        else:
            labels, masks = target["labels"].to(device), target["masks"].to(device)
            crowd = target.get("iscrowd")
            if crowd is not None:
                keep = ~crowd.to(device, torch.bool)
                labels, masks = labels[keep], masks[keep]
        out.append({"labels": labels.to(torch.int64), "masks": masks.to(torch.bool)})
    return out


def point_scales(batch: Batch, mask_shape: tuple[int, int], device: torch.device) -> Tensor:
    """``(B, 2)`` ``(sx, sy)``: the fraction of the padded stride-4 grid each real image covers."""
    rows, cols = mask_shape
    sizes = torch.tensor([[float(t["size"][1]), float(t["size"][0])] for t in batch["targets"]],
                         device=device)
    return sizes / torch.tensor([4.0 * cols, 4.0 * rows], device=device)


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


class MaskCriterion:
    """Hungarian-matched CE + mask BCE + dice over every output set (module docstring).

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
        self.num_classes = num_classes
        self.weights = {"class": class_weight, "mask": mask_weight, "dice": dice_weight}
        self.no_object_weight = no_object_weight
        self.num_points = num_points
        self.oversample_ratio, self.importance_sample_ratio = oversample_ratio, importance_sample_ratio

    def match(
        self, output: dict[str, Tensor], targets: list[dict[str, Tensor]], scales: Tensor
    ) -> list[tuple[Tensor, Tensor]]:
        """Per image ``(center indices, target indices)`` of the minimum-cost assignment."""
        logits, masks = output["pred_logits"], output["pred_masks"]
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

    def set_losses(
        self, output: dict[str, Tensor], targets: list[dict[str, Tensor]], scales: Tensor,
        num_masks: float,
    ) -> dict[str, Tensor]:
        """Unweighted ``class``, ``mask`` and ``dice`` losses of one output set."""
        logits, masks = output["pred_logits"].float(), output["pred_masks"]
        device = logits.device
        indices = self.match(output, targets, scales)
        labels = torch.full(logits.shape[:2], self.num_classes, dtype=torch.int64, device=device)
        for b, ((q, t), target) in enumerate(zip(indices, targets, strict=True)):
            labels[b, q.to(device)] = target["labels"][t.to(device)]
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
            "mask": sigmoid_bce_loss(pl, lab).sum() / num_masks,
            "dice": dice_loss(pl, lab).sum() / num_masks,
        }

    def __call__(
        self, outputs: dict[str, Any], targets: list[dict[str, Tensor]], scales: Tensor
    ) -> tuple[Tensor, dict[str, float]]:
        device = outputs["pred_logits"].device
        num_masks = global_num_boxes(sum(len(t["labels"]) for t in targets), device)
        sets = [("", outputs)] + [(f"_{i}", a) for i, a in enumerate(outputs.get("aux_outputs", []))]
        if "enc_outputs" in outputs:
            sets.append(("_enc", outputs["enc_outputs"]))
        total = outputs["pred_logits"].new_zeros((), dtype=torch.float32)
        scalars: dict[str, float] = {}
        for suffix, output in sets:
            for name, value in self.set_losses(output, targets, scales, num_masks).items():
                total = total + self.weights[name] * value
                if suffix in ("", "_enc"):
                    scalars[f"loss_{name}{suffix}"] = float(value.detach())
        scalars["loss"] = float(total.detach())
        return total, scalars


class SegmentationTask(Task):
    """Mask-classification segmentation: ``kind`` is ``instance``, ``semantic`` or ``panoptic``.

    Args:
        kind: the task. class_weight, mask_weight, dice_weight, no_object_weight, num_points,
            oversample_ratio, importance_sample_ratio: :class:`MaskCriterion`.
        top_k: instances kept per image (100). object_threshold, overlap_threshold: panoptic
            inference (0.8, 0.8). predictions_out: where the evaluator writes predictions.
    """

    def __init__(
        self, kind: str, *, class_weight: float = 2.0, mask_weight: float = 5.0,
        dice_weight: float = 5.0, no_object_weight: float = 0.1, num_points: int = 12544,
        oversample_ratio: float = 3.0, importance_sample_ratio: float = 0.75, top_k: int = 100,
        object_threshold: float = 0.8, overlap_threshold: float = 0.8,
        predictions_out: str | None = None, thing_classes: list[bool] | None = None,
    ) -> None:
        if kind not in SEGMENTATION_TASKS:
            raise ValueError(f"unknown segmentation task {kind!r}; expected one of {SEGMENTATION_TASKS}")
        self.name, self.primary_metric = kind, PRIMARY_METRICS[kind]
        self.loss_options = {
            "class_weight": class_weight, "mask_weight": mask_weight, "dice_weight": dice_weight,
            "no_object_weight": no_object_weight, "num_points": num_points,
            "oversample_ratio": oversample_ratio, "importance_sample_ratio": importance_sample_ratio,
        }
        self.top_k, self.object_threshold, self.overlap_threshold = top_k, object_threshold, overlap_threshold
        self.predictions_out = predictions_out
        self.thing_classes = thing_classes
        self.criterion: MaskCriterion | None = None

    def build_model(self, preset: str, num_classes: int, **overrides: Any) -> nn.Module:
        from clusterformer.models import create_model

        return create_model(preset, task=self.name, num_classes=num_classes, **overrides)

    def loss(self, outputs: Any, batch: Batch) -> tuple[Tensor, dict[str, float]]:
        num_classes = outputs["pred_logits"].shape[-1] - 1
        if self.criterion is None or self.criterion.num_classes != num_classes:
            self.criterion = MaskCriterion(num_classes, **self.loss_options)
        device = outputs["pred_logits"].device
        scales = point_scales(batch, tuple(outputs["pred_masks"].shape[-2:]), device)
        return self.criterion(outputs, mask_targets(batch, self.name, device), scales)

    def postprocess(self, outputs: Any, batch: Batch) -> list[Any]:
        """Per image, at its original size: semantic ``(H, W)`` int64 train ids; instance
        ``scores``, ``labels``, ``masks`` (k, H, W) bool, ``boxes``; panoptic ``panoptic``
        (H, W) int32 segment ids and ``segments`` (see :mod:`seg_inference`)."""
        results = []
        for b, target in enumerate(batch["targets"]):
            size = tuple(int(v) for v in target["size"])
            orig = tuple(int(v) for v in target["orig_size"])
            masks = masks_to_original(outputs["pred_masks"][b], size, orig)
            logits = outputs["pred_logits"][b]
            if self.name == "semantic":
                results.append(semantic_inference(logits, masks).argmax(0).cpu())
            elif self.name == "instance":
                pred = instance_inference(logits, masks, top_k=self.top_k)
                results.append({k: v.cpu() for k, v in pred.items()})
            else:
                things = self._things(logits.shape[-1] - 1, logits.device)
                pred = panoptic_inference(logits, masks, things, object_threshold=self.object_threshold,
                                          overlap_threshold=self.overlap_threshold)
                results.append({"panoptic": pred["panoptic"].cpu(), "segments": pred["segments"]})
        return results

    def _things(self, num_classes: int, device: torch.device) -> Tensor:
        if self.thing_classes is None:
            return torch.ones(num_classes, dtype=torch.bool, device=device)
        if len(self.thing_classes) != num_classes:
            raise ValueError(f"{len(self.thing_classes)} thing flags for a {num_classes}-class model")
        return torch.tensor(self.thing_classes, dtype=torch.bool, device=device)

    def set_categories(self, categories: list[dict]) -> None:
        """Take the thing / stuff split (panoptic inference) from the dataset's categories."""
        self.thing_classes = [bool(c.get("isthing", True)) for c in categories]

    def evaluator(self, num_classes: int, categories: list[dict] | None = None) -> Any:
        """The task's evaluator from ``clusterformer.metrics`` (segm AP, mIoU, PQ); also takes
        the thing / stuff split for panoptic post-processing from ``categories``."""
        if categories is None:
            raise ValueError(f"{self.name} evaluation needs the dataset's categories")
        if len(categories) != num_classes:
            raise ValueError(f"{len(categories)} categories for a {num_classes}-class model")
        self.set_categories(categories)
        import importlib

        try:
            metrics = importlib.import_module(f"clusterformer.metrics.{self.name}")
        except ImportError:
            raise ValueError(
                f"{self.name} evaluation is not available: clusterformer.metrics.{self.name} is missing"
            ) from None
        return metrics.build_evaluator(categories, predictions_out=self.predictions_out)

    def config(self) -> dict[str, Any]:
        return {**self.loss_options, "top_k": self.top_k, "object_threshold": self.object_threshold,
                "overlap_threshold": self.overlap_threshold}
