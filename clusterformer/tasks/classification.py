"""Image classification: cross-entropy with label smoothing, mixup / cutmix, top-k metrics.

The model is the backbone's global-average-pool classifier (architecture ``classifier``);
``head_pool="concat"`` is a backbone option. Data: ImageFolder datasets, one label per image,
random-resized crops for training.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from clusterformer.data.sample_spec import SampleSpec
from clusterformer.metrics.class_predictions import score_class_file
from clusterformer.metrics.topk import METRIC_KEYS, TopKAccumulator
from clusterformer.tasks.predictions import top_classes
from clusterformer.tasks.registry import register_task
from clusterformer.tasks.spec import Batch, ExportHeads, Task, TaskSpec, option


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
    """Top-1 / top-5 in percent over every rank (top-5 is top-min(5, C)); with ``per_class``
    also each class's top-1 accuracy (``Acc/<name>``). It also counts (true class, top-1 class)
    pairs for the confusion matrix (this process's samples: ``cf eval`` runs one)."""

    def __init__(self, categories: list[dict], per_class: bool = False) -> None:
        self.names = [str(c.get("name", c["id"])) for c in categories]
        self.acc = TopKAccumulator(num_classes=len(categories),
                                   class_names=self.names if per_class else None)  # fmt: skip
        self.conf = np.zeros((len(categories), len(categories)), dtype=np.int64)

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
        pairs = labels.cpu().long() * len(self.names) + predictions.argmax(-1).cpu().long()
        self.conf += np.bincount(pairs.numpy(), minlength=self.conf.size).reshape(self.conf.shape)

    def compute(self) -> dict[str, float]:
        return self.acc.compute()

    def confusion_matrix(self) -> tuple[np.ndarray, list[str]]:
        """(C, C) counts, rows the true class, columns the top-1 class; the class names."""
        return self.conf.copy(), list(self.names)

    def per_class_metrics(self) -> dict[str, float]:
        """``Acc/<class>``: top-1 accuracy (recall) in percent of each class with samples (the
        names ``--per-class`` uses)."""
        seen = self.conf.sum(1)
        return {f"Acc/{name}": 100.0 * float(self.conf[c, c]) / float(seen[c])
                for c, name in enumerate(self.names) if seen[c] > 0}  # fmt: skip


@dataclass
class ClassificationOptions:
    """The loss's label smoothing and the batch mixing (mixup / cutmix, timm's)."""

    label_smoothing: float = option(0.1, "label smoothing of the cross-entropy, in [0, 1)")
    mixup_alpha: float = option(0.0, "mixup alpha (0 = off)", flag="--mixup")
    cutmix_alpha: float = option(0.0, "cutmix alpha (0 = off)", flag="--cutmix")
    mix_switch_prob: float = option(0.5, "chance of cutmix when mixup and cutmix are both on")


class ClassificationTask(Task):
    """Classification with cross-entropy + label smoothing; optional mixup / cutmix."""

    def __init__(self, spec: TaskSpec, categories: list[dict], options: ClassificationOptions) -> None:
        super().__init__(spec, categories, options)
        if not 0.0 <= options.label_smoothing < 1.0:
            raise ValueError(f"label smoothing must be in [0, 1), got {options.label_smoothing}")

    def augment(self, batch: Batch, generator: torch.Generator | None = None) -> Batch:
        opts = self.options
        if opts.mixup_alpha <= 0 and opts.cutmix_alpha <= 0:
            return batch
        images, soft = mix_batch(
            batch["images"], batch["labels"], self.num_classes, mixup_alpha=opts.mixup_alpha,
            cutmix_alpha=opts.cutmix_alpha, switch_prob=opts.mix_switch_prob,
            smoothing=opts.label_smoothing, generator=generator,
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
        loss = F.cross_entropy(logits, labels, label_smoothing=self.options.label_smoothing)
        acc = (logits.detach().argmax(-1) == labels).float().mean()
        return loss, {"loss": float(loss.detach()), "train_top1": 100.0 * float(acc)}

    def postprocess(self, outputs: Tensor, batch: Batch) -> Tensor:
        """Scores ``(B, C)`` in float32 (softmax is monotonic, so logits rank the same)."""
        return outputs.detach().float()

    # TTA: a view is an image's class probabilities (C,); views are averaged and returned as
    # their log, so the result ranks, and softmaxes (cf predict's records), as the average.
    def view_scores(self, outputs: Tensor, batch: Batch) -> list[Tensor]:
        return list(outputs.detach().float().softmax(-1))

    def unflip_view(self, view: Tensor, orig_size: tuple[int, int] | None) -> Tensor:
        return view

    def combine_views(self, a: Tensor, b: Tensor) -> Tensor:
        return a + b

    def finish_views(self, combined: list[Tensor], count: int) -> Tensor:
        return (torch.stack(combined) / count).clamp_min(1e-12).log()

    def evaluator(self, predictions_out: Path | str | None = None,
                  per_class: bool = False) -> ClassificationEvaluator:  # fmt: skip
        return ClassificationEvaluator(self.categories, per_class)


def _softmax(raw: tuple[Tensor, ...], images: Tensor) -> tuple[Tensor, ...]:
    """``logits (B, C) -> probs (B, C)``."""
    return (raw[0].softmax(-1),)


SPEC = register_task(TaskSpec(
    name="classification",
    summary="one label per image (ImageFolder); top-1 / top-5 accuracy",
    primary_metric=METRIC_KEYS[0],
    metric_keys=METRIC_KEYS,
    data=SampleSpec(formats=("imagefolder",), fields=("label",), transform="image",
                    label_field="label"),
    architecture="classifier",
    options=ClassificationOptions,
    runtime=ClassificationTask,
    export=ExportHeads((), ("logits",), _softmax, ("probs",)),
    describe=lambda scores, categories, threshold, limit: top_classes(scores, categories),
    score_file=score_class_file,
    test_time=frozenset({"tta"}),
))
