"""Named presets, model architectures and ``create_model`` (a public entry point: its name,
arguments and defaults stay).

A model is ``preset options + overrides`` handed to an *architecture* builder: the classifier,
the detector or the segmenter here, or one a plugin registers. Which architecture a task uses
is the task's choice: each task module registers it with :func:`register_task_model` when it
is imported, so this module names no task.
"""

from __future__ import annotations

import copy
import inspect
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from clusterformer.models.backbone import ClusterFormer
from clusterformer.models.backbones import TIMM_PREFIX, FeatureClassifier, build_backbone
from clusterformer.models.detector import DETECTOR_OPTIONS, build_detector
from clusterformer.models.segmenter import SEGMENTER_OPTIONS, build_segmenter
from clusterformer.plugins import DEFAULT_TASK, load_task_modules

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

# Options every ClusterFormer backbone takes (a preset's and its overrides).
BACKBONE_OPTIONS: tuple[str, ...] = tuple(
    p for p in inspect.signature(ClusterFormer.__init__).parameters if p not in ("self", "num_classes")
)

Builder = Callable[..., nn.Module]


@dataclass(frozen=True)
class Architecture:
    """How to build one kind of model.

    Attributes:
        build: ``build(num_classes, backbone=None | "timm/<name>", **options) -> nn.Module``,
            ``options`` being the backbone's and the architecture's own.
        options: the names of its own options (besides the backbone's).
    """

    build: Builder
    options: tuple[str, ...] = ()


def _build_classifier(num_classes: int, backbone: str | None = None, **options: Any) -> nn.Module:
    if backbone is None:  # the ClusterFormer backbone has its own classifier head
        return ClusterFormer(num_classes=num_classes, **options)
    return FeatureClassifier(build_backbone(backbone, options), num_classes)


ARCHITECTURES: dict[str, Architecture] = {
    "classifier": Architecture(_build_classifier),
    "detector": Architecture(build_detector, DETECTOR_OPTIONS),
    "segmenter": Architecture(build_segmenter, SEGMENTER_OPTIONS),
}
TASK_ARCHITECTURES: dict[str, str] = {}


def register_architecture(name: str, architecture: Architecture) -> None:
    """Add (or replace) an architecture a task can build its models with."""
    ARCHITECTURES[name] = architecture


def register_task_model(task: str, architecture: str) -> None:
    """Make ``create_model(..., task=task)`` build ``architecture``."""
    if architecture not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {architecture!r}; expected one of "
                         f"{', '.join(ARCHITECTURES)}")  # fmt: skip
    TASK_ARCHITECTURES[task] = architecture


def list_models() -> list[str]:
    """The preset names, e.g. ``["clusterformer-nano", "clusterformer-tiny", ...]``."""
    return list(PRESETS)


def preset_config(name: str) -> dict[str, Any]:
    """A copy of the constructor options of preset ``name`` (ValueError if unknown)."""
    if name not in PRESETS:
        raise ValueError(f"unknown model {name!r}; available presets: {', '.join(PRESETS)} "
                         f"(or {TIMM_PREFIX}<name> with timm installed)")  # fmt: skip
    return copy.deepcopy(PRESETS[name])


def architecture_of(task: str) -> Architecture:
    """The architecture ``task`` builds (ValueError for an unknown task)."""
    if task not in TASK_ARCHITECTURES:
        load_task_modules()  # the task modules register their architectures on import
    if task not in TASK_ARCHITECTURES:
        raise ValueError(f"unknown task {task!r}; expected one of {', '.join(TASK_ARCHITECTURES)}")
    return ARCHITECTURES[TASK_ARCHITECTURES[task]]


def _check_overrides(overrides: dict[str, Any], architecture: Architecture, timm: bool) -> None:
    accepted = set(architecture.options) | (set() if timm else set(BACKBONE_OPTIONS))
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
    name: str, task: str = DEFAULT_TASK, num_classes: int = 1000, **overrides: Any
) -> nn.Module:
    """Build preset ``name`` (or ``timm/<model>``: a timm model's features as the backbone) for
    ``task`` with ``num_classes`` outputs.

    ``overrides`` replace preset options (see :class:`ClusterFormer`'s arguments) or set the
    architecture's own (e.g. the dense heads' :class:`~clusterformer.models.dense.
    DecoderOptions` by their flat names). The model carries ``model.model_config``
    (JSON-serialisable: ``name``, ``task``, ``num_classes`` and the overrides, enough to
    rebuild it with ``create_model(**model_config)``) and ``model.default_cfg`` (mean/std).

    Raises:
        ValueError: unknown preset or task.
        TypeError: an unknown or non-serialisable override.
    """
    timm = name.startswith(TIMM_PREFIX)
    options = {} if timm else preset_config(name)
    architecture = architecture_of(task)
    if not isinstance(num_classes, int) or num_classes < 0:
        raise ValueError(f"num_classes must be a non-negative int, got {num_classes!r}")
    _check_overrides(overrides, architecture, timm)
    options.update(overrides)
    model = architecture.build(num_classes, backbone=name if timm else None, **options)
    model.model_config = {"name": name, "task": task, "num_classes": num_classes, **overrides}
    return model
