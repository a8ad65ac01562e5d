"""A task defined outside the library: binary foreground segmentation (things vs the rest).

Loaded as a plugin (``CLUSTERFORMER_PLUGINS=foreground_task`` with this folder on the path),
it trains, evaluates, predicts and exports through the normal ``cf`` commands; nothing in
``clusterformer`` names it. It reads ADE20K-style label maps (``cf make-shapes``' semantic
PNGs), calls a pixel foreground when its class is a thing, and predicts it from any backbone
that follows the backbone contract: each map projected, brought to stride 4 and summed, then
one logit per pixel. Metric: the foreground IoU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from clusterformer.data import SampleSpec
from clusterformer.metrics.seg_common import to_original_size
from clusterformer.models import (
    Architecture,
    backbone_maps,
    build_backbone,
    feature_channels,
    register_architecture,
)
from clusterformer.tasks import ExportHeads, Task, TaskSpec, option, register_task
from clusterformer.tasks.predictions import segment
from clusterformer.tasks.seg_inference import masks_to_original

IGNORE = 255


class ForegroundNet(nn.Module):
    """Backbone maps -> ``{"fg_logits": (B, ceil(H / 4), ceil(W / 4))}``."""

    def __init__(self, backbone: nn.Module, width: int = 32) -> None:
        super().__init__()
        self.backbone = backbone
        if hasattr(backbone, "head_norm"):
            backbone.head_norm = nn.Identity()  # the classifier's norm is unused here
        self.default_cfg = dict(backbone.default_cfg)
        self.lateral = nn.ModuleList(nn.Conv2d(c, width, 1) for c in feature_channels(backbone))
        self.out = nn.Conv2d(width, 1, 3, padding=1)

    def forward(self, images: Tensor, pixel_mask: Tensor | None = None) -> dict[str, Tensor]:
        features, _ = backbone_maps(self.backbone, images, pixel_mask)
        size = features[0].shape[-2:]
        fused = sum(F.interpolate(conv(f), size=size, mode="nearest")
                    for conv, f in zip(self.lateral, features, strict=True))
        return {"fg_logits": self.out(F.relu(fused))[:, 0]}


def build(num_classes: int, backbone: str | None = None, **options: Any) -> ForegroundNet:
    return ForegroundNet(build_backbone(backbone, options))


register_architecture("foreground-net", Architecture(build))


@dataclass
class ForegroundOptions:
    fg_threshold: float = option(0.5, "foreground: probability above which a pixel is foreground")
    fg_pos_weight: float = option(1.0, "foreground: BCE weight of foreground pixels")


def foreground_map(label_map: Tensor, things: Tensor) -> Tensor:
    """``(H, W)`` train ids -> ``(H, W)`` float: 1 thing, 0 stuff, 255 ignore."""
    fg = torch.isin(label_map, things.to(label_map.device)).to(torch.float32)
    return torch.where(label_map == IGNORE, torch.full_like(fg, IGNORE), fg)


class ForegroundTask(Task):
    def __init__(self, spec: TaskSpec, categories: list[dict], options: ForegroundOptions) -> None:
        super().__init__(spec, categories, options)
        self.things = torch.tensor(categories[0]["things"], dtype=torch.int64)

    def loss(self, outputs: Any, batch: dict) -> tuple[Tensor, dict[str, float]]:
        logits = outputs["fg_logits"]
        height, width = batch["images"].shape[-2:]
        up = F.interpolate(logits[:, None], scale_factor=4.0, mode="bilinear")[:, 0, :height, :width]
        target = torch.full_like(up, IGNORE)
        for b, t in enumerate(batch["targets"]):
            h, w = t["semantic"].shape
            target[b, :h, :w] = foreground_map(t["semantic"], self.things)
        known = target != IGNORE
        weight = torch.where(target == 1, self.options.fg_pos_weight, 1.0)[known]
        loss = F.binary_cross_entropy_with_logits(up[known], target[known], weight=weight)
        return loss, {"loss": float(loss.detach())}

    def postprocess(self, outputs: Any, batch: dict) -> list[Tensor]:
        """Per image a ``(H, W)`` bool foreground mask at its original size."""
        logit = math.log(self.options.fg_threshold / (1 - self.options.fg_threshold))
        out = []
        for b, t in enumerate(batch["targets"]):
            size = tuple(int(v) for v in t["size"])
            orig = tuple(int(v) for v in t["orig_size"])
            up = masks_to_original(outputs["fg_logits"][b][None], size, orig)[0]
            out.append((up > logit).cpu())
        return out

    def evaluator(self, predictions_out: Path | str | None = None) -> ForegroundIoU:
        return ForegroundIoU(self.things)


class ForegroundIoU:
    """Foreground IoU over every labelled pixel at the images' original sizes, in percent."""

    def __init__(self, things: Tensor) -> None:
        self.things, self.inter, self.union, self.images = things, 0, 0, 0

    def update(self, predictions: list[Tensor], batch: dict) -> None:
        valid = batch.get("valid")
        for i, (pred, t) in enumerate(zip(predictions, batch["targets"], strict=True)):
            if valid is not None and not bool(valid[i]):
                continue
            truth = foreground_map(to_original_size(t["semantic"], t["orig_size"]).cpu(), self.things)
            known = truth != IGNORE
            fg = truth == 1
            self.inter += int((pred & fg & known).sum())
            self.union += int(((pred | fg) & known).sum())
            self.images += 1

    def compute(self) -> dict[str, float]:
        return {"fg_IoU": 100.0 * self.inter / max(self.union, 1), "num_images": float(self.images)}


def describe(mask: Tensor, categories: list[dict], threshold: float, limit: int) -> dict[str, Any]:
    return {"segments": [segment(mask, 0, categories, 0)] if bool(mask.any()) else []}


SPEC = register_task(TaskSpec(
    name="foreground",
    summary="binary foreground (thing pixels) from ADE20K-style label maps; foreground IoU",
    primary_metric="fg_IoU",
    metric_keys=("fg_IoU",),
    data=SampleSpec(formats=("ade20k",), fields=("semantic",)),
    architecture="foreground-net",
    options=ForegroundOptions,
    runtime=ForegroundTask,
    export=ExportHeads(("fg_logits",), ("fg_logits",), lambda raw, images: (raw[0].sigmoid(),),
                       ("fg_prob",)),
    describe=describe,
    categories=lambda dataset: [{"id": 1, "name": "foreground", "train_id": 0, "things": [
        int(c["train_id"]) for c in dataset if c.get("isthing")]}],
))
