"""Mask classification (Mask2Former's recipe), what instance, semantic and panoptic segmentation
share: options, criterion, the per-image inference loop.

Targets (per image, at the transformed, unpadded ``size``): a set of binary masks with train-id
labels; each task says how they come from its samples (:meth:`MaskTask.targets`). The
criterion is :class:`~clusterformer.tasks.criterion.MaskCriterion`; inference runs on one image
at a time at its original size (:mod:`clusterformer.tasks.seg_inference`), so results never
depend on batch size or padding.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from clusterformer.tasks.criterion import MaskCriterion, SetOptions
from clusterformer.tasks.seg_inference import masks_to_original
from clusterformer.tasks.spec import Batch, ExportHeads, Task, TaskSpec, option

MASK_EXPORT = ExportHeads(("pred_logits", "pred_masks"), ("pred_logits", "pred_masks"))


def mask_task_spec(**fields: Any) -> TaskSpec:
    """The spec of a mask-classification task: the segmenter, :class:`MaskOptions` and (unless
    ``fields`` gives its own ``export``) the raw mask outputs for export, plus ``fields``."""
    fields.setdefault("export", MASK_EXPORT)
    return TaskSpec(architecture="segmenter", options=MaskOptions, **fields)


@dataclass
class MaskOptions(SetOptions):
    """The mask criterion's weights and point sampling, and the inference thresholds (the
    three mask tasks share them; each reads the ones it needs)."""

    mask_weight: float = option(5.0, "mask BCE loss (and cost) weight")
    dice_weight: float = option(5.0, "dice loss (and cost) weight")
    no_object_weight: float = option(0.1, "cross-entropy weight of the no-object class")
    num_points: int = option(12544, "points sampled per mask for the mask losses and matching")
    oversample_ratio: float = option(3.0, "importance sampling: candidates per point")
    importance_sample_ratio: float = option(0.75, "importance sampling: share of uncertain points")
    object_threshold: float = option(0.8, "panoptic: keep centers whose class score exceeds this")
    overlap_threshold: float = option(0.8, "panoptic: drop segments keeping less of their mask")


def point_scales(batch: Batch, mask_shape: tuple[int, int], device: torch.device) -> Tensor:
    """``(B, 2)`` ``(sx, sy)``: the fraction of the padded stride-4 grid each real image covers."""
    rows, cols = mask_shape
    sizes = torch.tensor([[float(t["size"][1]), float(t["size"][0])] for t in batch["targets"]],
                         device=device)
    return sizes / torch.tensor([4.0 * cols, 4.0 * rows], device=device)


def instance_targets(batch: Batch, device: torch.device) -> list[dict[str, Tensor]]:
    """Per image the non-crowd ``labels`` (n,) int64 and ``masks`` (n, h, w) bool."""
    out = []
    for target in batch["targets"]:
        labels, masks = target["labels"].to(device), target["masks"].to(device)
        crowd = target.get("iscrowd")
        if crowd is not None:
            keep = ~crowd.to(device, torch.bool)
            labels, masks = labels[keep], masks[keep]
        out.append({"labels": labels.to(torch.int64), "masks": masks.to(torch.bool)})
    return out


class MaskTask(Task):
    """Mask-classification segmentation; subclasses say where the target masks come from
    (:meth:`targets`), how one image is inferred (:meth:`infer`) and scored (:meth:`evaluator`).
    """

    def __init__(self, spec: TaskSpec, categories: list[dict], options: MaskOptions) -> None:
        super().__init__(spec, categories, options)
        weights = ("class_weight", "mask_weight", "dice_weight", "no_object_weight", "num_points",
                   "oversample_ratio", "importance_sample_ratio")  # fmt: skip
        self.criterion = MaskCriterion(self.num_classes,
                                       **{k: getattr(options, k) for k in weights})  # fmt: skip

    def targets(self, batch: Batch, device: torch.device) -> list[dict[str, Tensor]]:
        """Per image ``labels`` (n,) int64 and ``masks`` (n, h, w) bool at its ``size``."""
        return instance_targets(batch, device)

    def infer(self, class_logits: Tensor, mask_logits: Tensor) -> Any:
        """One image's prediction from ``(Q, C + 1)`` logits and ``(Q, H, W)`` mask logits at
        its original size."""
        raise NotImplementedError

    def loss(self, outputs: Any, batch: Batch) -> tuple[Tensor, dict[str, float]]:
        device = outputs["pred_logits"].device
        scales = point_scales(batch, tuple(outputs["pred_masks"].shape[-2:]), device)
        return self.criterion(outputs, self.targets(batch, device), scales)

    def original_masks(self, outputs: Any, batch: Batch) -> Iterator[tuple[Tensor, Tensor]]:
        """Per image: its ``(Q, C + 1)`` class logits and ``(Q, H, W)`` mask logits at its
        original size (``orig_size``)."""
        for b, target in enumerate(batch["targets"]):
            size = tuple(int(v) for v in target["size"])
            orig = tuple(int(v) for v in target["orig_size"])
            yield outputs["pred_logits"][b], masks_to_original(outputs["pred_masks"][b], size, orig)

    def postprocess(self, outputs: Any, batch: Batch) -> list[Any]:
        """Per image, at its original size, what :meth:`infer` gives (on the CPU)."""
        return [self.infer(logits, masks) for logits, masks in self.original_masks(outputs, batch)]

    def evaluator(self, predictions_out: Path | str | None = None, per_class: bool = False) -> Any:
        raise NotImplementedError
