"""Tasks: targets, losses and post-processing, one module per task (imports ops and models)."""

from __future__ import annotations

from typing import Any

from clusterformer.tasks.base import Evaluator, Task

TASK_NAMES: tuple[str, ...] = ("classification", "detection", "instance", "semantic", "panoptic")
AVAILABLE_TASKS: tuple[str, ...] = ("classification", "detection", "instance", "semantic", "panoptic")


def get_task(name: str, **options: Any) -> Task:
    """The :class:`Task` called ``name``, configured with ``options``.

    Raises:
        ValueError: unknown task, or a task of the paper not implemented yet.
    """
    if name == "classification":
        from clusterformer.tasks.classification import ClassificationTask

        return ClassificationTask(**options)
    if name == "detection":
        from clusterformer.tasks.detection import DetectionTask

        # The generic loop passes classification's options to every task; detection has none.
        unused = ("label_smoothing", "mixup_alpha", "cutmix_alpha")
        return DetectionTask(**{k: v for k, v in options.items() if k not in unused})
    if name in ("instance", "semantic", "panoptic"):
        from clusterformer.tasks.segmentation import SegmentationTask

        unused = ("label_smoothing", "mixup_alpha", "cutmix_alpha")
        return SegmentationTask(name, **{k: v for k, v in options.items() if k not in unused})
    if name in TASK_NAMES:
        raise ValueError(
            f"task '{name}' is not available yet (it arrives in a later release); "
            f"available: {', '.join(AVAILABLE_TASKS)}"
        )
    raise ValueError(f"unknown task '{name}'; choose one of {', '.join(TASK_NAMES)}")


__all__ = ["AVAILABLE_TASKS", "TASK_NAMES", "Evaluator", "Task", "get_task"]
