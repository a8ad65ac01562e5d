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
from clusterformer.tasks.masks import MASK_EXPORT, MaskOptions, MaskTask
from clusterformer.tasks.predictions import segment
from clusterformer.tasks.registry import register_task
from clusterformer.tasks.seg_inference import instance_inference
from clusterformer.tasks.spec import TaskSpec


class InstanceTask(MaskTask):
    def infer(self, class_logits: Tensor, mask_logits: Tensor) -> dict[str, Tensor]:
        """``scores``, ``labels``, ``masks`` (k, H, W) bool, ``boxes`` (k, 4)."""
        pred = instance_inference(class_logits, mask_logits, top_k=self.options.top_k)
        return {k: v.cpu() for k, v in pred.items()}

    def evaluator(self, predictions_out: Path | str | None = None) -> Any:
        from clusterformer.metrics.instance import InstanceEvaluator

        return InstanceEvaluator(self.categories, predictions_out=predictions_out)


def describe(pred: dict, categories: list[dict], threshold: float, limit: int) -> dict[str, Any]:
    """Instances scoring at least ``threshold`` (at most ``limit``) with a non-empty mask."""
    keep = (pred["scores"] >= threshold) & pred["masks"].flatten(1).any(1)
    kept = zip(pred["masks"][keep][:limit], pred["labels"][keep][:limit].tolist(),
               pred["scores"][keep][:limit].tolist(), strict=True)  # fmt: skip
    return {"segments": [segment(mask, int(label), categories, i, score)
                         for i, (mask, label, score) in enumerate(kept)]}  # fmt: skip


def _score_file(predictions: Path, data: Path, *, num_workers: int = 0) -> dict[str, Any]:
    from clusterformer.metrics.instance import score_instance_file

    return score_instance_file(predictions, data, task="instance", num_workers=num_workers)


SPEC = register_task(TaskSpec(
    name="instance",
    summary="instance masks (COCO instances JSON); COCO segm AP and box AP",
    primary_metric="segm_AP",
    metric_keys=("segm_AP", "segm_AP50", "segm_AP75", "bbox_AP", "bbox_AP50", "bbox_AP75"),
    data=SampleSpec(formats=("coco",), fields=("boxes", "labels", "iscrowd", "masks")),
    architecture="segmenter",
    options=MaskOptions,
    runtime=InstanceTask,
    export=MASK_EXPORT,
    describe=describe,
    score_file=_score_file,
    prediction_suffix=".segm.json",
))
