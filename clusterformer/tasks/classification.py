"""Image classification: cross-entropy with label smoothing, mixup / cutmix, top-k metrics.

The head is the backbone's global-average-pool classifier (``create_model(...,
task="classification")``); ``head_pool="concat"`` is passed through as a model override
where the backbone supports it.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from clusterformer.metrics.topk import TopKAccumulator
from clusterformer.tasks.base import Batch, Task


def smooth_one_hot(labels: Tensor, num_classes: int, smoothing: float) -> Tensor:
    """Label-smoothed one-hot targets.

    Args:
        labels: ``(B,)`` int64.
    Returns:
        ``(B, C)`` float32 rows summing to 1: ``1 - s + s/C`` on the label, ``s/C`` elsewhere.
    """
    off = smoothing / num_classes
    targets = torch.full((labels.shape[0], num_classes), off, device=labels.device)
    return targets.scatter(1, labels[:, None], 1.0 - smoothing + off)


def cutmix_box(
    height: int, width: int, lam: float, generator: torch.Generator | None
) -> tuple[int, int, int, int]:
    """A random box covering about ``1 - lam`` of an ``height x width`` image: (y0, y1, x0, x1)."""
    ratio = math.sqrt(1.0 - lam)
    bh, bw = int(height * ratio), int(width * ratio)
    cy = int(torch.randint(height, (1,), generator=generator))
    cx = int(torch.randint(width, (1,), generator=generator))
    y0, y1 = max(cy - bh // 2, 0), min(cy + bh // 2, height)
    x0, x1 = max(cx - bw // 2, 0), min(cx + bw // 2, width)
    return y0, y1, x0, x1


def mix_batch(
    images: Tensor,
    labels: Tensor,
    num_classes: int,
    *,
    mixup_alpha: float = 0.0,
    cutmix_alpha: float = 0.0,
    switch_prob: float = 0.5,
    smoothing: float = 0.0,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Batch mixup or cutmix (one of them per batch) with the batch's reversal as partner.

    Args:
        images: ``(B, 3, H, W)``; labels: ``(B,)`` int64.
        switch_prob: chance of cutmix when both alphas are positive.
    Returns:
        mixed images ``(B, 3, H, W)`` (a new tensor) and soft targets ``(B, C)``.
    """
    targets = smooth_one_hot(labels, num_classes, smoothing)
    use_cutmix = cutmix_alpha > 0 and (
        mixup_alpha <= 0 or float(torch.rand((), generator=generator)) < switch_prob
    )
    alpha = cutmix_alpha if use_cutmix else mixup_alpha
    if alpha <= 0:
        return images, targets
    lam = _beta(alpha, generator)
    flipped = images.flip(0)
    if use_cutmix:
        h, w = images.shape[-2:]
        y0, y1, x0, x1 = cutmix_box(h, w, lam, generator)
        box = torch.zeros(h, w, dtype=torch.bool, device=images.device)
        box[y0:y1, x0:x1] = True
        mixed = torch.where(box, flipped, images)
        lam = 1.0 - (y1 - y0) * (x1 - x0) / float(h * w)  # the box was clipped at the border
    else:
        mixed = images * lam + flipped * (1.0 - lam)
    return mixed, targets * lam + targets.flip(0) * (1.0 - lam)


def _beta(alpha: float, generator: torch.Generator | None) -> float:
    # torch's Gamma sampler takes no generator; draw a seed from it for numpy's Beta instead,
    # so the mixing weight follows the seeded generator (or the global torch RNG).
    seed = int(torch.randint(2**31 - 1, (1,), generator=generator))
    return float(np.random.default_rng(seed).beta(alpha, alpha))


class ClassificationEvaluator:
    """Top-1 / top-5 in percent over every rank (top-5 is top-min(5, C))."""

    def __init__(self, num_classes: int) -> None:
        self.acc = TopKAccumulator((1, 5), num_classes=num_classes)

    def update(self, predictions: Tensor, batch: Batch) -> None:
        """predictions: ``(B, C)`` scores; batch["labels"]: ``(B,)``.

        Entries whose ``batch["valid"]`` flag is False (the loader's distributed padding) are
        skipped, so every sample counts exactly once over all ranks.
        """
        labels = batch["labels"]
        valid = batch.get("valid")
        if valid is not None:
            keep = torch.as_tensor(valid, dtype=torch.bool, device=predictions.device)
            predictions, labels = predictions[keep], labels.to(keep.device)[keep]
        self.acc.update(predictions, labels)

    def compute(self) -> dict[str, float]:
        return self.acc.compute()


class ClassificationTask(Task):
    """Classification with cross-entropy + label smoothing; optional mixup / cutmix."""

    name = "classification"
    primary_metric = "top1"

    def __init__(
        self,
        label_smoothing: float = 0.1,
        mixup_alpha: float = 0.0,
        cutmix_alpha: float = 0.0,
        mix_switch_prob: float = 0.5,
        num_classes: int | None = None,
    ) -> None:
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label smoothing must be in [0, 1), got {label_smoothing}")
        self.label_smoothing = label_smoothing
        self.mixup_alpha = mixup_alpha
        self.cutmix_alpha = cutmix_alpha
        self.mix_switch_prob = mix_switch_prob
        self.num_classes = num_classes

    def build_model(self, preset: str, num_classes: int, **overrides: Any) -> nn.Module:
        from clusterformer.models import create_model

        self.num_classes = num_classes  # mixup builds (B, C) soft targets
        return create_model(preset, task="classification", num_classes=num_classes, **overrides)

    def augment(self, batch: Batch, generator: torch.Generator | None = None) -> Batch:
        if self.mixup_alpha <= 0 and self.cutmix_alpha <= 0:
            return batch
        if self.num_classes is None:
            raise ValueError("mixup/cutmix need the number of classes: call build_model first")
        images, soft = mix_batch(
            batch["images"],
            batch["labels"],
            self.num_classes,
            mixup_alpha=self.mixup_alpha,
            cutmix_alpha=self.cutmix_alpha,
            switch_prob=self.mix_switch_prob,
            smoothing=self.label_smoothing,
            generator=generator,
        )
        return {**batch, "images": images, "soft_labels": soft}

    def loss(self, outputs: Tensor, batch: Batch) -> tuple[Tensor, dict[str, float]]:
        """outputs: ``(B, C)`` logits; batch["labels"] ``(B,)`` or batch["soft_labels"] ``(B, C)``."""
        logits = outputs.float()
        soft = batch.get("soft_labels")
        if soft is not None:
            loss = -(soft * F.log_softmax(logits, dim=-1)).sum(-1).mean()
            return loss, {"loss": float(loss.detach())}
        labels = batch["labels"]
        loss = F.cross_entropy(logits, labels, label_smoothing=self.label_smoothing)
        acc = (logits.detach().argmax(-1) == labels).float().mean()
        return loss, {"loss": float(loss.detach()), "train_top1": 100.0 * float(acc)}

    def postprocess(self, outputs: Tensor, batch: Batch) -> Tensor:
        """Scores ``(B, C)`` in float32 (softmax is monotonic, so logits rank the same)."""
        return outputs.detach().float()

    def evaluator(
        self, num_classes: int, categories: list[dict] | None = None
    ) -> ClassificationEvaluator:
        return ClassificationEvaluator(num_classes)

    def config(self) -> dict[str, Any]:
        return {
            "label_smoothing": self.label_smoothing,
            "mixup_alpha": self.mixup_alpha,
            "cutmix_alpha": self.cutmix_alpha,
            "mix_switch_prob": self.mix_switch_prob,
        }
