"""Instance segmentation: mask classification over the non-crowd COCO instances; COCO segm AP
(and box AP of the boxes around the masks).

Inference keeps the top-``k`` (center, class) pairs (:func:`~clusterformer.tasks.
seg_inference.instance_inference`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import Tensor

from clusterformer.data.sample_spec import SampleSpec
from clusterformer.metrics.instance import METRIC_KEYS, score_instance_file
from clusterformer.tasks.masks import MaskTask, mask_task_spec
from clusterformer.tasks.predictions import segment
from clusterformer.tasks.registry import register_task
from clusterformer.tasks.seg_inference import instance_inference


class InstanceTask(MaskTask):
    def infer(self, class_logits: Tensor, mask_logits: Tensor) -> dict[str, Tensor]:
        """``scores``, ``labels``, ``masks`` (k, H, W) bool, ``boxes`` (k, 4)."""
        pred = instance_inference(class_logits, mask_logits, top_k=self.options.top_k)
        return {k: v.cpu() for k, v in pred.items()}

    def evaluator(self, predictions_out: Path | str | None = None, per_class: bool = False) -> Any:
        from clusterformer.metrics.instance import InstanceEvaluator

        return InstanceEvaluator(self.categories, predictions_out=predictions_out,
                                 per_class=per_class)  # fmt: skip


def describe(pred: dict, categories: list[dict], threshold: float, limit: int) -> dict[str, Any]:
    """Instances scoring at least ``threshold`` (at most ``limit``) with a non-empty mask."""
    keep = (pred["scores"] >= threshold) & pred["masks"].flatten(1).any(1)
    kept = zip(pred["masks"][keep][:limit], pred["labels"][keep][:limit].tolist(),
               pred["scores"][keep][:limit].tolist(), strict=True)  # fmt: skip
    return {"segments": [segment(mask, int(label), categories, i, score)
                         for i, (mask, label, score) in enumerate(kept)]}  # fmt: skip


SPEC = register_task(mask_task_spec(
    name="instance",
    summary="instance masks (COCO instances JSON); COCO segm AP and box AP",
    primary_metric=METRIC_KEYS[0],
    metric_keys=METRIC_KEYS,
    data=SampleSpec(formats=("coco",), fields=("boxes", "labels", "iscrowd", "masks")),
    runtime=InstanceTask,
    describe=describe,
    score_file=score_instance_file,
    prediction_suffix=".segm.json",
))
