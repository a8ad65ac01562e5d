"""Box operations as pure functions.

Boxes are ``(..., 4)`` tensors in one of two layouts: ``xyxy`` (left, top, right, bottom)
or ``cxcywh`` (centre x, centre y, width, height), in any unit (pixels or normalised).
Pairwise functions broadcast over leading dimensions ``...`` and compare every box of the
first set with every box of the second. Nothing here branches on data, so every function
runs under ``torch.compile(fullgraph=True)`` and ``torch.func.vmap``.
"""

from __future__ import annotations

import torch
from torch import Tensor

_EPS = 1e-7


def box_cxcywh_to_xyxy(boxes: Tensor) -> Tensor:
    """``(..., 4)`` cxcywh -> ``(..., 4)`` xyxy."""
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], dim=-1)


def box_xyxy_to_cxcywh(boxes: Tensor) -> Tensor:
    """``(..., 4)`` xyxy -> ``(..., 4)`` cxcywh."""
    x0, y0, x1, y1 = boxes.unbind(-1)
    return torch.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], dim=-1)


def box_xyxy_to_xywh(boxes: Tensor) -> Tensor:
    """``(..., 4)`` xyxy -> ``(..., 4)`` COCO ``[x, y, width, height]``."""
    x0, y0, x1, y1 = boxes.unbind(-1)
    return torch.stack([x0, y0, x1 - x0, y1 - y0], dim=-1)


def box_area(boxes: Tensor) -> Tensor:
    """Area of ``(..., 4)`` xyxy boxes -> ``(...)``; degenerate (inverted) boxes count as 0."""
    x0, y0, x1, y1 = boxes.unbind(-1)
    return (x1 - x0).clamp_min(0) * (y1 - y0).clamp_min(0)


def _pairwise_inter_union(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """Intersection and union of ``(..., N, 4)`` x ``(..., M, 4)`` xyxy -> two ``(..., N, M)``."""
    a_ = a.unsqueeze(-2)
    b_ = b.unsqueeze(-3)
    lt = torch.maximum(a_[..., :2], b_[..., :2])
    rb = torch.minimum(a_[..., 2:], b_[..., 2:])
    wh = (rb - lt).clamp_min(0)
    inter = wh[..., 0] * wh[..., 1]
    union = box_area(a).unsqueeze(-1) + box_area(b).unsqueeze(-2) - inter
    return inter, union


def box_iou(a: Tensor, b: Tensor) -> Tensor:
    """Pairwise IoU.

    Args:
        a: ``(..., N, 4)`` xyxy; b: ``(..., M, 4)`` xyxy (leading dims broadcast).

    Returns:
        ``(..., N, M)`` in ``[0, 1]``; two empty boxes have IoU 0.
    """
    inter, union = _pairwise_inter_union(a, b)
    return inter / union.clamp_min(_EPS)


def generalized_box_iou(a: Tensor, b: Tensor) -> Tensor:
    r"""Pairwise generalized IoU (Rezatofighi et al., 2019).

    .. math:: \mathrm{GIoU} = \mathrm{IoU} - \frac{|C| - |A \cup B|}{|C|}

    with ``C`` the smallest box enclosing both.

    Args:
        a: ``(..., N, 4)`` xyxy; b: ``(..., M, 4)`` xyxy.

    Returns:
        ``(..., N, M)`` in ``[-1, 1]``.
    """
    inter, union = _pairwise_inter_union(a, b)
    iou = inter / union.clamp_min(_EPS)
    a_ = a.unsqueeze(-2)
    b_ = b.unsqueeze(-3)
    lt = torch.minimum(a_[..., :2], b_[..., :2])
    rb = torch.maximum(a_[..., 2:], b_[..., 2:])
    wh = (rb - lt).clamp_min(0)
    hull = wh[..., 0] * wh[..., 1]
    return iou - (hull - union) / hull.clamp_min(_EPS)


def elementwise_generalized_box_iou(a: Tensor, b: Tensor) -> Tensor:
    """GIoU of matching pairs: ``(..., 4)`` xyxy and ``(..., 4)`` xyxy -> ``(...)``.

    The diagonal of :func:`generalized_box_iou` without building the ``N x M`` matrix.
    """
    lt = torch.maximum(a[..., :2], b[..., :2])
    rb = torch.minimum(a[..., 2:], b[..., 2:])
    wh = (rb - lt).clamp_min(0)
    inter = wh[..., 0] * wh[..., 1]
    union = box_area(a) + box_area(b) - inter
    iou = inter / union.clamp_min(_EPS)
    lt_c = torch.minimum(a[..., :2], b[..., :2])
    rb_c = torch.maximum(a[..., 2:], b[..., 2:])
    wh_c = (rb_c - lt_c).clamp_min(0)
    hull = wh_c[..., 0] * wh_c[..., 1]
    return iou - (hull - union) / hull.clamp_min(_EPS)


def masks_to_boxes(masks: Tensor) -> Tensor:
    """Tight xyxy boxes around binary masks, in pixel-edge coordinates.

    A mask covering columns ``x0..x1`` and rows ``y0..y1`` (inclusive) gives the box
    ``(x0, y0, x1 + 1, y1 + 1)``, the convention of COCO boxes (a one-pixel mask has area 1).

    Args:
        masks: ``(..., H, W)`` bool (or any dtype; nonzero = inside).

    Returns:
        ``(..., 4)`` float32 xyxy; an empty mask gives ``(0, 0, 0, 0)``.
    """
    height, width = masks.shape[-2:]
    inside = masks != 0
    rows = inside.any(dim=-1)  # (..., H)
    cols = inside.any(dim=-2)  # (..., W)
    ys = torch.arange(height, device=masks.device, dtype=torch.float32)
    xs = torch.arange(width, device=masks.device, dtype=torch.float32)
    big_y, big_x = float(height), float(width)
    y0 = torch.where(rows, ys, big_y).amin(dim=-1)
    y1 = torch.where(rows, ys, -1.0).amax(dim=-1) + 1
    x0 = torch.where(cols, xs, big_x).amin(dim=-1)
    x1 = torch.where(cols, xs, -1.0).amax(dim=-1) + 1
    boxes = torch.stack([x0, y0, x1, y1], dim=-1)
    nonempty = rows.any(dim=-1, keepdim=True)
    return torch.where(nonempty, boxes, torch.zeros_like(boxes))


def inverse_sigmoid(x: Tensor, eps: float = 1e-5) -> Tensor:
    """``logit(x)`` with ``x`` clamped to ``[eps, 1 - eps]`` so it stays finite."""
    x = x.clamp(eps, 1 - eps)
    return torch.log(x / (1 - x))
