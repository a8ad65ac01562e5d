"""The detail a finished ``COCOeval`` already holds beyond AP / AP50 / AP75: AP by object size,
AR@100 and the AP of each class -- read from pycocotools' own arrays, never recomputed, so the
numbers are pycocotools' (the per-class AP is detectron2's reading of ``eval["precision"]``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

# COCOeval.stats positions (maxDets 1, 10, 100): AP small / medium / large, AR@100.
SIZE_STATS: tuple[tuple[str, int], ...] = (("APs", 3), ("APm", 4), ("APl", 5), ("AR100", 8))


def detail_keys(prefix: str) -> tuple[str, ...]:
    """``("bbox_APs", "bbox_APm", "bbox_APl", "bbox_AR100")`` for ``prefix`` ``"bbox"``."""
    return tuple(f"{prefix}_{name}" for name, _ in SIZE_STATS)


def _percent(value: float) -> float:
    return float(value) * 100 if value >= 0 else -1.0


def cocoeval_detail(coco_eval: Any, prefix: str, categories: Sequence[dict]) -> dict[str, float]:
    """AP small / medium / large, AR@100 and ``<prefix>_AP/<class name>`` (percent; ``-1``: no
    ground truth of that size or class) of a ``COCOeval`` after ``summarize()``.

    A class's AP is the mean of ``eval["precision"][:, :, k, area all, maxDets 100]`` over its
    entries > -1, as ``COCOeval`` averages the overall AP.
    """
    stats = coco_eval.stats
    out = {f"{prefix}_{name}": _percent(stats[i]) for name, i in SIZE_STATS}
    precision = coco_eval.eval["precision"]  # (iou thresholds, recall, classes, areas, maxDets)
    cat_ids = list(coco_eval.params.catIds)
    for cat in categories:
        k = cat_ids.index(int(cat["id"]))
        values = precision[:, :, k, 0, -1]
        values = values[values > -1]
        ap = float(np.mean(values)) if values.size else -1.0
        out[f"{prefix}_AP/{cat.get('name', cat['id'])}"] = _percent(ap)
    return out


def empty_detail(prefix: str, categories: Sequence[dict], annotations: Sequence[dict]) -> dict[str, float]:
    """The detail keys when nothing was detected: 0 where there is ground truth, else -1."""
    present = {int(a["category_id"]) for a in annotations if not a.get("iscrowd")}
    out = dict.fromkeys(detail_keys(prefix), 0.0 if present else -1.0)
    out.update({f"{prefix}_AP/{c.get('name', c['id'])}": 0.0 if int(c["id"]) in present else -1.0
                for c in categories})  # fmt: skip
    return out
