"""Named presets and ``create_model`` (DESIGN §5 contract).

A model is ``preset options + overrides`` handed to a task builder. Builders are looked up in
``TASK_BUILDERS`` (task -> callable), so a later issue adds a dense task with
``register_task("panoptic", build_fn)`` without touching this file.
"""

from __future__ import annotations

import copy
import inspect
import json
from collections.abc import Callable
from typing import Any

from torch import nn

from clusterformer.models.backbone import ClusterFormer
from clusterformer.models.detector import DETECTOR_OPTIONS, build_detector
from clusterformer.models.segmenter import SEGMENTER_OPTIONS, build_segmenter

TASKS: tuple[str, ...] = ("classification", "detection", "instance", "semantic", "panoptic")

PRESETS: dict[str, dict[str, Any]] = {
    # CPU-sized: ~1.9 M params (1000 classes), fast at 64-128 px on two cores; tests, quickstart.
    "clusterformer-nano": {
        "depths": (1, 1, 2, 1), "dims": (32, 64, 128, 256), "mlp_ratios": (4, 4, 4, 4),
        "head_dim": 32, "num_iters": 3,
    },
    "clusterformer-tiny": {
        "depths": (2, 2, 6, 2), "dims": (96, 192, 384, 768), "mlp_ratios": (8, 8, 4, 4),
        "head_dim": 32, "num_iters": 3,
    },
    "clusterformer-small": {
        "depths": (2, 2, 18, 2), "dims": (96, 192, 384, 768), "mlp_ratios": (8, 8, 4, 4),
        "head_dim": 32, "num_iters": 3,
    },
}

Builder = Callable[..., nn.Module]


def _build_classifier(num_classes: int, **options: Any) -> nn.Module:
    return ClusterFormer(num_classes=num_classes, **options)


TASK_BUILDERS: dict[str, Builder] = {
    "classification": _build_classifier, "detection": build_detector,
    **{task: build_segmenter for task in ("instance", "semantic", "panoptic")},
}
# Options a task's builder takes on top of the backbone's (e.g. the detector's decoder size).
TASK_OPTIONS: dict[str, tuple[str, ...]] = {
    "detection": DETECTOR_OPTIONS,
    **{task: SEGMENTER_OPTIONS for task in ("instance", "semantic", "panoptic")},
}


def register_task(task: str, builder: Builder, options: tuple[str, ...] = ()) -> None:
    """Make ``create_model(..., task=task)`` call ``builder(num_classes, **options)``;
    ``options`` names the overrides the builder accepts besides the backbone's."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
    TASK_BUILDERS[task] = builder
    TASK_OPTIONS[task] = tuple(options)


def list_models() -> list[str]:
    """The preset names, e.g. ``["clusterformer-nano", "clusterformer-tiny", ...]``."""
    return list(PRESETS)


def preset_config(name: str) -> dict[str, Any]:
    """A copy of the constructor options of preset ``name`` (ValueError if unknown)."""
    if name not in PRESETS:
        raise ValueError(f"unknown model {name!r}; available presets: {', '.join(PRESETS)}")
    return copy.deepcopy(PRESETS[name])


def _check_overrides(overrides: dict[str, Any], task: str) -> None:
    accepted = set(inspect.signature(ClusterFormer.__init__).parameters) - {"self", "num_classes"}
    accepted |= set(TASK_OPTIONS.get(task, ()))
    unknown = sorted(set(overrides) - accepted)
    if unknown:
        raise TypeError(
            f"unknown model option(s) {', '.join(unknown)}; accepted: {', '.join(sorted(accepted))}"
        )
    try:
        json.dumps(overrides)
    except TypeError as exc:
        raise TypeError(f"model options must be JSON-serialisable: {exc}") from exc


def create_model(
    name: str, task: str = "classification", num_classes: int = 1000, **overrides: Any
) -> nn.Module:
    """Build preset ``name`` for ``task`` with ``num_classes`` outputs.

    ``overrides`` replace preset options (see :class:`ClusterFormer`'s arguments). The model
    carries ``model.model_config`` (JSON-serialisable: ``name``, ``task``, ``num_classes`` and
    the overrides, enough to rebuild it with ``create_model(**model_config)``) and
    ``model.default_cfg`` (ImageNet mean/std, input size).

    Raises:
        ValueError: unknown preset, unknown task, or a task whose head is not available yet.
        TypeError: an unknown or non-serialisable override.
    """
    options = preset_config(name)
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")
    if task not in TASK_BUILDERS:
        raise ValueError(
            f"the {task} head is not available yet; available tasks: {', '.join(TASK_BUILDERS)}"
        )
    if not isinstance(num_classes, int) or num_classes < 0:
        raise ValueError(f"num_classes must be a non-negative int, got {num_classes!r}")
    _check_overrides(overrides, task)
    options.update(overrides)
    model = TASK_BUILDERS[task](num_classes, **options)
    model.model_config = {"name": name, "task": task, "num_classes": num_classes, **overrides}
    return model
