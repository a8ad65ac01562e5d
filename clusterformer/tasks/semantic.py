"""Semantic segmentation: mask classification with one target mask per class present (the
ignore label 255 belongs to none); mIoU and pixel accuracy.

Inference scores every class by ``einsum(softmax(cls)[:, :C], sigmoid(mask))`` and takes the
argmax per pixel (:func:`~clusterformer.tasks.seg_inference.semantic_inference`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from clusterformer.data.sample_spec import SampleSpec
from clusterformer.metrics.semantic import METRIC_KEYS, score_semantic_folder
from clusterformer.tasks.masks import MASK_EXPORT, MaskTask, mask_task_spec
from clusterformer.tasks.predictions import label_map_segments
from clusterformer.tasks.registry import register_task
from clusterformer.tasks.seg_inference import semantic_inference
from clusterformer.tasks.spec import Batch, ExportHeads
from clusterformer.tasks.tta import normalise_scores

IGNORE_INDEX = 255


class SemanticTask(MaskTask):
    def targets(self, batch: Batch, device: torch.device) -> list[dict[str, Tensor]]:
        """One mask per class present in each image's label map."""
        out = []
        for target in batch["targets"]:
            label_map = target["semantic"].to(device)
            labels = torch.unique(label_map)
            labels = labels[labels != IGNORE_INDEX]
            masks = label_map.unsqueeze(0) == labels.view(-1, 1, 1)
            out.append({"labels": labels.to(torch.int64), "masks": masks.to(torch.bool)})
        return out

    def infer(self, class_logits: Tensor, mask_logits: Tensor) -> Tensor:
        """``(H, W)`` int64 train ids."""
        return semantic_inference(class_logits, mask_logits).argmax(0).cpu()

    # TTA and sliding windows: a view is an image's (C, H, W) class probabilities at its
    # original size (the inference scores normalised per pixel); views are averaged.
    def view_scores(self, outputs: Any, batch: Batch) -> list[Tensor]:
        return [normalise_scores(semantic_inference(logits, masks))
                for logits, masks in self.original_masks(outputs, batch)]  # fmt: skip

    def unflip_view(self, view: Tensor, orig_size: tuple[int, int] | None) -> Tensor:
        return view.flip(-1)

    def combine_views(self, a: Tensor, b: Tensor) -> Tensor:
        return a + b

    def finish_views(self, combined: list[Tensor], count: int) -> list[Tensor]:
        return [scores.argmax(0).cpu() for scores in combined]

    def window_scores(self, outputs: Any, batch: Batch) -> Tensor:
        # Windows come with orig_size == size: the masks at the window's own size.
        return torch.stack([semantic_inference(logits, masks)
                            for logits, masks in self.original_masks(outputs, batch)])  # fmt: skip

    def evaluator(self, predictions_out: Path | str | None = None, per_class: bool = False) -> Any:
        from clusterformer.metrics.semantic import SemanticEvaluator

        return SemanticEvaluator(self.categories, predictions_out=predictions_out,
                                 per_class=per_class)  # fmt: skip


def semantic_label_map(raw: tuple[Tensor, ...], images: Tensor) -> tuple[Tensor, ...]:
    """The exported graph's post-processing: the label map at the input's size, as
    :meth:`SemanticTask.infer` computes it for an unpadded image.

    Args:
        raw: ``pred_logits (B, Q, C + 1)``, ``pred_masks (B, Q, H/4, W/4)``.
        images: the graph input ``(B, 3, H, W)``.

    Returns:
        ``label_map (B, H, W)`` int64 train ids, ``label_scores (B, H, W)`` the winning class's
        score and ``label_margins (B, H, W)`` its lead over the runner-up (a pixel with a
        margin near 0 may flip between runtimes; the parity check skips those).
    """
    class_logits, mask_logits = raw
    height, width = images.shape[-2], images.shape[-1]
    masks = F.interpolate(mask_logits.float(), scale_factor=4.0, mode="bilinear",
                          align_corners=False)[..., :height, :width]  # fmt: skip
    probs = class_logits.float().softmax(-1)[..., :-1]
    scores = torch.einsum("bqc,bqhw->bchw", probs, masks.sigmoid())
    if scores.shape[1] == 1:  # one class: its runner-up is "nothing" (score 0)
        scores = torch.cat([scores, torch.zeros_like(scores)], 1)
    top = scores.topk(2, dim=1)
    best = top.values[:, 0]
    return top.indices[:, 0], best, best - top.values[:, 1]


SPEC = register_task(mask_task_spec(
    name="semantic",
    summary="a class per pixel (ADE20K-style label PNGs); mIoU, aAcc",
    primary_metric=METRIC_KEYS[0],
    metric_keys=METRIC_KEYS,
    data=SampleSpec(formats=("ade20k",), fields=("semantic",)),
    runtime=SemanticTask,
    describe=lambda label_map, categories, threshold, limit: label_map_segments(label_map,
                                                                                categories),
    score_file=score_semantic_folder,
    prediction_suffix=".semantic",
    test_time=frozenset({"tta", "slide"}),
    export=ExportHeads(MASK_EXPORT.raw_keys, MASK_EXPORT.raw_names, semantic_label_map,
                       ("label_map", "label_scores", "label_margins")),
))
