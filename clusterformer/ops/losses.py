"""Loss functions as pure functions (elementwise unless a reduction is named).

Reductions over matched pairs and normalisation by the number of target boxes belong to
the task's criterion (``clusterformer.tasks``); these functions only compute per-element
or per-pair terms so the criterion can sum and normalise them as it needs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from clusterformer.ops.boxes import box_cxcywh_to_xyxy, elementwise_generalized_box_iou


def sigmoid_focal_loss(
    logits: Tensor, targets: Tensor, *, alpha: float = 0.25, gamma: float = 2.0
) -> Tensor:
    r"""Sigmoid focal loss (Lin et al., 2017), elementwise.

    .. math:: \mathrm{FL} = -\alpha_t (1 - p_t)^\gamma \log p_t

    Args:
        logits: ``(...)`` raw scores.
        targets: ``(...)`` same shape, in ``[0, 1]`` (one-hot or soft).
        alpha: weight of the positive class (``alpha_t = alpha`` for positives,
            ``1 - alpha`` for negatives); a negative value disables the weighting.
        gamma: focusing exponent.

    Returns:
        ``(...)`` per-element losses.
    """
    prob = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = prob * targets + (1 - prob) * (1 - targets)
    loss = ce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
    return loss


def l1_box_loss(pred: Tensor, target: Tensor) -> Tensor:
    """Per-box L1 distance of ``(..., 4)`` boxes (any layout) -> ``(...)`` (sum over 4)."""
    return (pred - target).abs().sum(dim=-1)


def giou_box_loss(pred_cxcywh: Tensor, target_cxcywh: Tensor) -> Tensor:
    """``1 - GIoU`` of matched pairs of ``(..., 4)`` cxcywh boxes -> ``(...)`` in ``[0, 2]``."""
    return 1 - elementwise_generalized_box_iou(
        box_cxcywh_to_xyxy(pred_cxcywh), box_cxcywh_to_xyxy(target_cxcywh)
    )


def dice_loss(logits: Tensor, targets: Tensor, eps: float = 1.0) -> Tensor:
    """Soft dice loss per mask.

    Args:
        logits: ``(..., P)`` mask logits over ``P`` pixels (or sampled points).
        targets: ``(..., P)`` in ``[0, 1]``.

    Returns:
        ``(...)`` ``1 - (2 |p t| + eps) / (|p| + |t| + eps)``.
    """
    prob = logits.sigmoid()
    numerator = 2 * (prob * targets).sum(dim=-1)
    denominator = prob.sum(dim=-1) + targets.sum(dim=-1)
    return 1 - (numerator + eps) / (denominator + eps)


def sigmoid_bce_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean binary cross-entropy per mask: ``(..., P)`` logits and targets -> ``(...)``."""
    return F.binary_cross_entropy_with_logits(logits, targets, reduction="none").mean(dim=-1)


def one_hot_targets(labels: Tensor, num_classes: int, *, dtype: torch.dtype) -> Tensor:
    """``(...)`` int64 labels, ``num_classes`` meaning "no object" -> ``(..., C)`` one-hot.

    The "no object" label gives an all-zero row, which is what the sigmoid focal loss
    expects for unmatched queries.
    """
    full = F.one_hot(labels, num_classes + 1).to(dtype)
    return full[..., :num_classes]
