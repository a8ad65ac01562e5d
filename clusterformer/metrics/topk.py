"""Top-k accuracy for classification, in percent.

``top5`` on a dataset with fewer than five classes is defined as top-``min(5, C)``
accuracy (so it is 100 % when ``C <= k``): the name stays stable across datasets and the
number stays meaningful ("the true class is among the best k the model can rank").
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

# The k values ``cf eval`` reports, and their metric keys (DESIGN.md: ``top1``, ``top5``).
TOP_KS: tuple[int, ...] = (1, 5)
METRIC_KEYS: tuple[str, ...] = tuple(f"top{k}" for k in TOP_KS)
# Top-k accuracy keys (``top5``): meaningless to show when k >= the number of classes.
TOP_K = re.compile(r"top(\d+)")


def trivial_top_k(metrics: Mapping[str, Any], num_classes: int | None) -> list[str]:
    """The ``top<k>`` keys of ``metrics`` with ``k >= num_classes``: every image's class is
    among the top k, so the value says nothing (100 %). Tables and log lines leave them out;
    the metric files keep them (``top5`` is a fixed key)."""
    if num_classes is None:
        return []
    return [key for key in metrics
            if (m := TOP_K.fullmatch(key)) is not None and int(m.group(1)) >= num_classes]  # fmt: skip


def topk_correct(logits: Tensor, labels: Tensor, ks: Sequence[int] = (1, 5)) -> dict[int, Tensor]:
    """Count samples whose label is among the ``min(k, C)`` highest scores.

    Args:
        logits: ``(N, C)`` scores (any real dtype).
        labels: ``(N,)`` int64 class ids in ``[0, C)``.
        ks: the k values to count.

    Returns:
        ``{k: int64 scalar tensor}`` number of correct samples for each requested k.
    """
    if logits.ndim != 2 or labels.ndim != 1 or logits.shape[0] != labels.shape[0]:
        raise ValueError(
            f"topk_correct expects logits (N, C) and labels (N,), got {tuple(logits.shape)} "
            f"and {tuple(labels.shape)}"
        )
    num_classes = logits.shape[1]
    kmax = min(max(ks), num_classes)
    ranked = logits.topk(kmax, dim=1).indices  # (N, kmax)
    return ranked_topk_correct(ranked, labels, ks, num_classes=num_classes)


def ranked_topk_correct(
    ranked: Tensor, labels: Tensor, ks: Sequence[int] = (1, 5), *, num_classes: int | None = None
) -> dict[int, Tensor]:
    """Like :func:`topk_correct` for predictions already given as ranked class ids.

    Args:
        ranked: ``(N, R)`` int64 class ids, best first (``R`` may be smaller than k: a
            prediction with a single class id counts the same for every k).
        labels: ``(N,)`` int64 true class ids.
        ks: the k values to count.
        num_classes: ``C``; k is clipped to ``min(k, C)`` when given.

    Returns:
        ``{k: int64 scalar tensor}``.
    """
    hits = ranked == labels[:, None]  # (N, R)
    out: dict[int, Tensor] = {}
    for k in ks:
        kk = k if num_classes is None else min(k, num_classes)
        out[k] = hits[:, :kk].any(dim=1).sum()
    return out


def topk_accuracy(logits: Tensor, labels: Tensor, ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """Top-k accuracy in percent: ``{"top1": ..., "top5": ...}`` (keys ``f"top{k}"``).

    Args:
        logits: ``(N, C)``; labels: ``(N,)``.
    """
    n = labels.shape[0]
    if n == 0:
        raise ValueError("topk_accuracy needs at least one sample")
    counts = topk_correct(logits, labels, ks)
    return {f"top{k}": 100.0 * counts[k].item() / n for k in ks}


class TopKAccumulator:
    """Running top-k counts over batches; ``compute`` sums across distributed ranks.

    Use ``update(logits, labels)`` with raw scores or ``update_ranked(ranked, labels)`` with
    ranked class ids; ``compute()`` returns ``{"top1": %, "top5": %, "num_samples": n}``, and
    with ``class_names`` (one per class id) also ``Acc/<name>``: the top-1 accuracy over the
    samples of that class (``-1`` for a class without samples).
    """

    def __init__(self, ks: Sequence[int] = TOP_KS, num_classes: int | None = None,
                 class_names: Sequence[str] | None = None) -> None:  # fmt: skip
        self.ks = tuple(ks)
        self.num_classes = num_classes
        self.correct = torch.zeros(len(self.ks), dtype=torch.float64)
        self.count = torch.zeros((), dtype=torch.float64)
        self.class_names = list(class_names) if class_names is not None else None
        width = len(self.class_names) if self.class_names is not None else 0
        self.class_hits = torch.zeros(width, dtype=torch.float64)  # top-1 right, by true class
        self.class_count = torch.zeros(width, dtype=torch.float64)

    def update(self, logits: Tensor, labels: Tensor) -> None:
        logits, labels = logits.detach().float().cpu(), labels.cpu()
        counts = topk_correct(logits, labels, self.ks)
        self._add(counts, labels.shape[0])
        if labels.numel():
            self._add_per_class(logits.argmax(1), labels)

    def update_ranked(self, ranked: Tensor, labels: Tensor) -> None:
        ranked, labels = ranked.cpu(), labels.cpu()
        counts = ranked_topk_correct(ranked, labels, self.ks, num_classes=self.num_classes)
        self._add(counts, labels.shape[0])
        if labels.numel():
            self._add_per_class(ranked[:, 0], labels)

    def _add(self, counts: dict[int, Tensor], n: int) -> None:
        self.correct = self.correct + torch.stack([counts[k].double() for k in self.ks])
        self.count = self.count + n

    def _add_per_class(self, top1: Tensor, labels: Tensor) -> None:
        if self.class_names is None:
            return
        width = len(self.class_names)
        self.class_count += torch.bincount(labels, minlength=width).double()
        self.class_hits += torch.bincount(labels[top1 == labels], minlength=width).double()

    def compute(self) -> dict[str, float]:
        totals = torch.cat([self.correct, self.count[None], self.class_hits, self.class_count])
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            device = _reduce_device()
            totals = totals.to(device)
            torch.distributed.all_reduce(totals)
            totals = totals.cpu()
        width = self.class_hits.numel()
        hits, count = totals[len(self.ks) + 1:].split([width, width])
        n = totals[len(self.ks)].item()
        if n == 0:
            raise ValueError("no samples were evaluated (empty dataset?)")
        result = {f"top{k}": 100.0 * totals[i].item() / n for i, k in enumerate(self.ks)}
        result["num_samples"] = int(n)
        for name, right, seen in zip(self.class_names or [], hits.tolist(), count.tolist(),
                                     strict=True):  # fmt: skip
            result[f"Acc/{name}"] = 100.0 * right / seen if seen else -1.0
        return result


def _reduce_device() -> torch.device:
    # NCCL only reduces CUDA tensors; gloo reduces CPU ones.
    if torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
