"""Per-class metrics as one plain structure, class name -> its metrics.

Evaluators asked for per-class results (``task.evaluator(per_class=True)``, ``score_file(...,
per_class=True)``) add flat keys ``<metric>/<class name>`` to their metrics -- ``bbox_AP/cat``,
``segm_AP/cat``, ``PQ/sky``, ``SQ/sky``, ``RQ/sky``, ``IoU/road``, ``Acc/daisy`` -- so that the
metrics stay one flat dict of numbers (``metrics.jsonl``, distributed broadcast). Metric names
never hold a ``/``; class names may, so the key is split at its first ``/``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

PerClass = dict[str, dict[str, float]]


def split_per_class(metrics: Mapping[str, Any]) -> tuple[dict[str, Any], PerClass]:
    """``(summary, per_class)``: the metrics without their ``<metric>/<class>`` keys, and those
    keys grouped as ``{class name: {metric: value}}`` in the order the classes first appear
    (the dataset's category order). Values are percent; ``-1`` means the class has no ground
    truth for that metric (COCOeval's convention)."""
    summary: dict[str, Any] = {}
    per_class: PerClass = {}
    for key, value in metrics.items():
        metric, sep, name = key.partition("/")
        if sep and metric and name:
            per_class.setdefault(name, {})[metric] = value
        else:
            summary[key] = value
    return summary, per_class


def per_class_metrics(metrics: Mapping[str, Any]) -> PerClass:
    """``{class name: {metric: value}}`` of a metrics dict (see :func:`split_per_class`): what
    ``cf eval --per-class`` prints, writes under ``"per_class"`` and plots."""
    return split_per_class(metrics)[1]
