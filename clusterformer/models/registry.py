"""Model architectures, the task -> architecture table and ``create_model`` (a public entry
point: its name, arguments and defaults stay).

A model is a backbone (a preset or any registered one, :mod:`.backbones`) with its options and
overrides, handed to an *architecture* builder: the classifier, the detector or the segmenter
here, or one a plugin registers. Which architecture a task uses is the task's choice: each task
module registers it with :func:`register_task_model` when it is imported, so this module names
no task.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from clusterformer.models.backbones import (
    PRESETS,
    FeatureClassifier,
    backbone_defaults,
    backbone_options,
    build_backbone,
    resolve_backbone,
)
from clusterformer.models.detector import DETECTOR_OPTIONS, build_detector
from clusterformer.models.segmenter import SEGMENTER_OPTIONS, build_segmenter
from clusterformer.plugins import DEFAULT_TASK, load_task_modules
from clusterformer.registry import Registry

# Options every ClusterFormer backbone takes (a preset's and its overrides).
BACKBONE_OPTIONS: tuple[str, ...] = backbone_options("clusterformer-nano")

Builder = Callable[..., nn.Module]


@dataclass(frozen=True)
class Architecture:
    """How to build one kind of model.

    Attributes:
        build: ``build(num_classes, backbone=None | "<model name>", **options) -> nn.Module``,
            ``options`` being the backbone's and the architecture's own; it builds the backbone
            with :func:`~clusterformer.models.backbones.build_backbone` (``None``: the
            ClusterFormer backbone with ``options``).
        options: the names of its own options (besides the backbone's).
    """

    build: Builder
    options: tuple[str, ...] = ()


def _build_classifier(num_classes: int, backbone: str | None = None, **options: Any) -> nn.Module:
    if backbone is None or resolve_backbone(backbone)[0].classifies:  # its own classifier head
        return build_backbone(backbone, options, num_classes=num_classes)
    return FeatureClassifier(build_backbone(backbone, options), num_classes)


ARCHITECTURES: Registry[Architecture] = Registry("architecture", load=load_task_modules)
ARCHITECTURES.register("classifier", Architecture(_build_classifier))
ARCHITECTURES.register("detector", Architecture(build_detector, DETECTOR_OPTIONS))
ARCHITECTURES.register("segmenter", Architecture(build_segmenter, SEGMENTER_OPTIONS))
# task name -> the name of the architecture it builds (filled by the task modules).
TASK_ARCHITECTURES: Registry[str] = Registry("task", load=load_task_modules)


def register_architecture(name: str, architecture: Architecture, *, replace: bool = False) -> None:
    """Add an architecture a task can build its models with.

    Raises:
        DuplicateNameError: ``name`` is taken and ``replace`` is false.
    """
    ARCHITECTURES.register(name, architecture, replace=replace)


def register_task_model(task: str, architecture: str, *, replace: bool = False) -> None:
    """Make ``create_model(..., task=task)`` build ``architecture``.

    Raises:
        ValueError: an unknown architecture; DuplicateNameError: ``task`` has one already and
            ``replace`` is false.
    """
    if architecture not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {architecture!r}; expected one of "
                         f"{', '.join(ARCHITECTURES.names())}")  # fmt: skip
    TASK_ARCHITECTURES.register(task, architecture, replace=replace)


def list_models() -> list[str]:
    """The preset names, e.g. ``["clusterformer-nano", "clusterformer-tiny", ...]``."""
    return list(PRESETS)


def preset_config(name: str) -> dict[str, Any]:
    """A copy of the constructor options of preset ``name`` (ValueError if unknown)."""
    if name not in PRESETS:
        raise ValueError(f"unknown model {name!r}; available presets: {', '.join(PRESETS)}")
    return backbone_defaults(name)


def architecture_of(task: str) -> Architecture:
    """The architecture ``task`` builds (ValueError for an unknown task)."""
    return ARCHITECTURES.get(TASK_ARCHITECTURES.get(task))


def _check_overrides(overrides: dict[str, Any], architecture: Architecture, name: str) -> None:
    accepted = set(architecture.options) | set(backbone_options(name))
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
    """Build model ``name`` (a preset, ``timm/<model>`` or any registered backbone, see
    :func:`~clusterformer.models.backbones.register_backbone`) for ``task`` with
    ``num_classes`` outputs.

    ``overrides`` replace the backbone's options (a preset's: see :class:`ClusterFormer`'s
    arguments) or set the architecture's own (e.g. the dense heads' :class:`~clusterformer.
    models.dense.DecoderOptions` by their flat names). The model carries ``model.model_config``
    (JSON-serialisable: ``name``, ``task``, ``num_classes`` and the overrides, enough to
    rebuild it with ``create_model(**model_config)``) and ``model.default_cfg`` (mean/std).

    Raises:
        ValueError: unknown model name or task.
        TypeError: an unknown or non-serialisable override.
    """
    options = backbone_defaults(name)
    architecture = architecture_of(task)
    if not isinstance(num_classes, int) or num_classes < 0:
        raise ValueError(f"num_classes must be a non-negative int, got {num_classes!r}")
    _check_overrides(overrides, architecture, name)
    options.update(overrides)
    model = architecture.build(num_classes, backbone=name, **options)
    model.model_config = {"name": name, "task": task, "num_classes": num_classes, **overrides}
    return model
