"""The models ``cf benchmark`` times: names on the command line -> 1000-class classifiers.

Models are named as on the command line: a preset (``clusterformer-tiny``), a preset with
constructor overrides (``clusterformer-tiny:num_iters=1``; ``grad_checkpointing=true`` turns on
activation checkpointing), or a timm model (``timm/swin_tiny_patch4_window7_224``, needs the
optional ``timm`` package: the ``clusterformer[bench]`` extra). All are 1000-class classifiers
fed a ``(B, 3, S, S)`` batch without a pixel mask.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

PEERS: tuple[str, ...] = (
    "timm/swin_tiny_patch4_window7_224",
    "timm/convnext_tiny",
    "timm/resnet50",
)
NUM_CLASSES = 1000


@dataclass(frozen=True)
class ModelSpec:
    """One model to time: ``source`` is ``"clusterformer"`` or ``"timm"``."""

    label: str
    source: str
    name: str
    overrides: dict[str, Any] = field(default_factory=dict)


def parse_model(spec: str) -> ModelSpec:
    """``clusterformer-tiny``, ``clusterformer-tiny:num_iters=1,head_pool=concat`` or
    ``timm/<name>`` -> :class:`ModelSpec`.

    Raises:
        ValueError: an unknown preset or a malformed override.
    """
    from clusterformer.models.backbones import timm_model_name

    if (timm_name := timm_model_name(spec)) is not None:
        return ModelSpec(spec, "timm", timm_name)
    from clusterformer.models import list_models

    name, _, options = spec.partition(":")
    if name not in list_models():
        raise ValueError(
            f"unknown model '{name}'; expected a preset ({', '.join(list_models())}) "
            "or timm/<name>"
        )
    overrides: dict[str, Any] = {}
    for item in filter(None, options.split(",")):
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"'{spec}': overrides are key=value pairs separated by commas")
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value
    return ModelSpec(spec, "clusterformer", name, overrides)


def build_model(spec: ModelSpec) -> nn.Module:
    """A fresh 1000-class classifier for ``spec`` (random weights; nothing is downloaded)."""
    if spec.source == "timm":
        from clusterformer.models.timm_backbone import import_timm

        timm = import_timm(spec.label)  # names the fix for a torchvision built for another torch
        return timm.create_model(spec.name, pretrained=False, num_classes=NUM_CLASSES)
    from clusterformer.models import create_model

    options = dict(spec.overrides)
    checkpointing = bool(options.pop("grad_checkpointing", False))
    model = create_model(spec.name, num_classes=NUM_CLASSES, **options)
    if checkpointing:
        model.set_grad_checkpointing(True)
    return model


def timm_available() -> bool:
    """Whether timm can be imported; a timm that cannot load with this torch (a torchvision
    built for another one) raises ValueError naming the torchvision to install."""
    from clusterformer.models.timm_backbone import import_timm, torchvision_mismatch

    try:
        import_timm("cf benchmark")
    except ValueError as exc:
        if str(exc) == torchvision_mismatch():
            raise
        return False
    return True


def count_gflops(spec: ModelSpec, image_size: int) -> float:
    """Forward GFLOPs of one image (matmul and conv FLOPs, 2 per multiply-add)."""
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    model = build_model(spec).eval()
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(torch.randn(1, 3, image_size, image_size))
    return counter.get_total_flops() / 1e9
