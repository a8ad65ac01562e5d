"""Metrics: top-k, COCO AP (pycocotools), PQ, mIoU."""

from clusterformer.metrics.topk import (
    TopKAccumulator,
    ranked_topk_correct,
    topk_accuracy,
    topk_correct,
)

__all__ = ["TopKAccumulator", "ranked_topk_correct", "topk_accuracy", "topk_correct"]
