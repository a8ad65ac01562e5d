"""Bipartite (Hungarian) matching between predictions and targets, DETR-style.

The cost matrix is a pure, differentiable-free torch function over the whole batch
(predictions of every image against the targets of every image, concatenated); the
assignment itself runs per image on the CPU with ``scipy.optimize.linear_sum_assignment``
over the image's own block of columns. Images without targets get empty index tensors.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from clusterformer.ops.boxes import box_cxcywh_to_xyxy, generalized_box_iou


def focal_class_cost(
    logits: Tensor, labels: Tensor, *, alpha: float = 0.25, gamma: float = 2.0
) -> Tensor:
    """Classification cost of Deformable DETR: the focal loss of calling a prediction
    positive for the target's class minus that of calling it negative.

    Args:
        logits: ``(..., Q, C)`` class logits.
        labels: ``(T,)`` int64 target classes.

    Returns:
        ``(..., Q, T)``; lower is a better match.
    """
    prob = logits.sigmoid()
    neg = (1 - alpha) * prob**gamma * -torch.log((1 - prob).clamp_min(1e-8))
    pos = alpha * (1 - prob) ** gamma * -torch.log(prob.clamp_min(1e-8))
    return (pos - neg)[..., labels]


def detection_cost(
    pred_logits: Tensor,
    pred_boxes: Tensor,
    tgt_labels: Tensor,
    tgt_boxes: Tensor,
    *,
    class_weight: float = 2.0,
    l1_weight: float = 5.0,
    giou_weight: float = 2.0,
    alpha: float = 0.25,
    gamma: float = 2.0,
) -> Tensor:
    """The matching cost ``class_weight * focal + l1_weight * L1 + giou_weight * (-GIoU)``.

    Args:
        pred_logits: ``(B, Q, C)`` class logits.
        pred_boxes: ``(B, Q, 4)`` cxcywh, normalised.
        tgt_labels: ``(T,)`` int64, the targets of all images concatenated.
        tgt_boxes: ``(T, 4)`` cxcywh, normalised the same way, concatenated in the same order.

    Returns:
        ``(B, Q, T)`` float32 cost; split the last dim by the per-image target counts.
    """
    logits = pred_logits.float()
    boxes = pred_boxes.float()
    targets = tgt_boxes.float()
    cost_class = focal_class_cost(logits, tgt_labels, alpha=alpha, gamma=gamma)
    cost_l1 = torch.cdist(boxes, targets.unsqueeze(0).expand(boxes.shape[0], -1, -1), p=1)
    cost_giou = -generalized_box_iou(box_cxcywh_to_xyxy(boxes), box_cxcywh_to_xyxy(targets))
    return class_weight * cost_class + l1_weight * cost_l1 + giou_weight * cost_giou


def hungarian_match(cost: Tensor, sizes: Sequence[int]) -> list[tuple[Tensor, Tensor]]:
    """Minimum-cost one-to-one assignment per image.

    Args:
        cost: ``(B, Q, T)`` with ``T = sum(sizes)``: image ``i``'s targets are columns
            ``sum(sizes[:i]) : sum(sizes[:i + 1])``. Non-finite entries are treated as a very
            large cost (never preferred, but the assignment stays defined).
        sizes: the number of targets of each of the ``B`` images.

    Returns:
        One ``(pred_idx, tgt_idx)`` pair of int64 CPU tensors per image, each of length
        ``min(Q, sizes[i])``, ``pred_idx`` increasing; ``tgt_idx`` indexes the image's own
        targets (``0..sizes[i]-1``). An image without targets gives two empty tensors.
    """
    from scipy.optimize import linear_sum_assignment

    if cost.ndim != 3:
        raise ValueError(f"cost must be (B, Q, T), got shape {tuple(cost.shape)}")
    if len(sizes) != cost.shape[0] or sum(sizes) != cost.shape[-1]:
        raise ValueError(
            f"sizes {list(sizes)} do not fit a cost of shape {tuple(cost.shape)}"
        )
    matrix = cost.detach().to("cpu", torch.float64)
    finite = matrix[torch.isfinite(matrix)]
    big = float(finite.abs().max()) * 2 + 1e6 if finite.numel() else 1e6
    matrix = torch.nan_to_num(matrix, nan=big, posinf=big, neginf=-big).numpy()
    out: list[tuple[Tensor, Tensor]] = []
    start = 0
    for i, size in enumerate(sizes):
        block = matrix[i, :, start : start + size]
        start += size
        rows, cols = linear_sum_assignment(block)
        out.append((torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64)))
    return out
