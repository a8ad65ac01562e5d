"""Panoptic segmentation: mask classification over the non-crowd segments, things and stuff;
panopticapi's PQ, SQ, RQ (and for things and stuff apart).

Inference keeps confident centers, gives each pixel to one of them and merges stuff segments
of a class (:func:`~clusterformer.tasks.seg_inference.panoptic_inference`); which classes are
things comes from the categories (``isthing``) the task is built with.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from clusterformer.data.sample_spec import SampleSpec
from clusterformer.metrics.panoptic import METRIC_KEYS, score_panoptic
from clusterformer.tasks.masks import MaskOptions, MaskTask, mask_task_spec
from clusterformer.tasks.predictions import segment
from clusterformer.tasks.registry import register_task
from clusterformer.tasks.seg_inference import panoptic_inference
from clusterformer.tasks.spec import TaskSpec


class PanopticTask(MaskTask):
    def __init__(self, spec: TaskSpec, categories: list[dict], options: MaskOptions) -> None:
        super().__init__(spec, categories, options)
        self.thing_classes = torch.tensor([bool(c.get("isthing", True)) for c in categories],
                                          dtype=torch.bool)  # fmt: skip

    def infer(self, class_logits: Tensor, mask_logits: Tensor) -> dict[str, Any]:
        """``panoptic`` (H, W) int32 segment ids and ``segments`` (see seg_inference)."""
        pred = panoptic_inference(
            class_logits, mask_logits, self.thing_classes.to(class_logits.device),
            object_threshold=self.options.object_threshold,
            overlap_threshold=self.options.overlap_threshold,
        )
        return {"panoptic": pred["panoptic"].cpu(), "segments": pred["segments"]}

    def evaluator(self, predictions_out: Path | str | None = None, per_class: bool = False) -> Any:
        from clusterformer.metrics.panoptic import PanopticEvaluator

        return PanopticEvaluator(self.categories, predictions_out=predictions_out,
                                 per_class=per_class)  # fmt: skip


def describe(pred: dict, categories: list[dict], threshold: float, limit: int) -> dict[str, Any]:
    """Every segment, with its panoptic ``id`` and ``isthing``."""
    segments = []
    for i, info in enumerate(pred["segments"]):
        seg = segment(pred["panoptic"] == info["id"], int(info["category_id"]), categories, i,
                      info["score"])  # fmt: skip
        segments.append({"id": int(info["id"]), "isthing": bool(info["isthing"]), **seg})
    return {"segments": segments}


SPEC = register_task(mask_task_spec(
    name="panoptic",
    summary="things and stuff (COCO panoptic JSON + PNGs); PQ, SQ, RQ",
    primary_metric=METRIC_KEYS[0],
    metric_keys=METRIC_KEYS,
    data=SampleSpec(formats=("coco-panoptic",),
                    fields=("masks", "labels", "isthing", "iscrowd", "boxes", "segment_ids")),
    runtime=PanopticTask,
    describe=describe,
    score_file=score_panoptic,
    prediction_suffix=".panoptic.json",
))
