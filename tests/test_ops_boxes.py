"""Box ops and box losses against hand-computed values, plus properties."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from clusterformer.ops.boxes import (
    box_area,
    box_cxcywh_to_xyxy,
    box_iou,
    box_xyxy_to_cxcywh,
    box_xyxy_to_xywh,
    elementwise_generalized_box_iou,
    generalized_box_iou,
    inverse_sigmoid,
    masks_to_boxes,
)
from clusterformer.ops.losses import (
    dice_loss,
    giou_box_loss,
    l1_box_loss,
    one_hot_targets,
    sigmoid_focal_loss,
)


def _random_xyxy(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g)
    wh = torch.rand(n, 2, generator=g) * 0.5 + 0.01
    return torch.cat([xy, xy + wh], -1)


def test_conversions_known_values() -> None:
    cxcywh = torch.tensor([[5.0, 4.0, 2.0, 6.0]])
    xyxy = torch.tensor([[4.0, 1.0, 6.0, 7.0]])
    assert torch.equal(box_cxcywh_to_xyxy(cxcywh), xyxy)
    assert torch.equal(box_xyxy_to_cxcywh(xyxy), cxcywh)
    assert torch.equal(box_xyxy_to_xywh(xyxy), torch.tensor([[4.0, 1.0, 2.0, 6.0]]))
    assert box_area(xyxy).item() == 12.0
    assert box_area(torch.tensor([3.0, 3.0, 1.0, 5.0])).item() == 0.0  # inverted box


def test_iou_and_giou_hand_computed() -> None:
    a = torch.tensor([[0.0, 0.0, 2.0, 2.0]])
    b = torch.tensor([[1.0, 1.0, 3.0, 3.0], [0.0, 0.0, 2.0, 2.0], [3.0, 0.0, 4.0, 1.0]])
    # b0: inter 1, union 4 + 4 - 1 = 7, hull 3x3 = 9 -> GIoU 1/7 - 2/9
    # b1: identical -> 1, 1
    # b2: disjoint, union 4 + 1 = 5, hull 4x2 = 8 -> GIoU 0 - 3/8
    iou = box_iou(a, b)
    giou = generalized_box_iou(a, b)
    assert iou.shape == (1, 3)
    torch.testing.assert_close(iou, torch.tensor([[1 / 7, 1.0, 0.0]]))
    torch.testing.assert_close(giou, torch.tensor([[1 / 7 - 2 / 9, 1.0, -3 / 8]]))
    pair = elementwise_generalized_box_iou(a.expand(3, 4), b)
    torch.testing.assert_close(pair, giou[0])
    torch.testing.assert_close(
        giou_box_loss(box_xyxy_to_cxcywh(a.expand(3, 4)), box_xyxy_to_cxcywh(b)), 1 - giou[0]
    )


def test_pairwise_broadcasts_over_leading_dims() -> None:
    a = torch.stack([_random_xyxy(4, 0), _random_xyxy(4, 1)])
    b = torch.stack([_random_xyxy(3, 2), _random_xyxy(3, 3)])
    batched = generalized_box_iou(a, b)
    assert batched.shape == (2, 4, 3)
    for i in range(2):
        torch.testing.assert_close(batched[i], generalized_box_iou(a[i], b[i]))


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 10_000))
def test_iou_giou_ranges_and_symmetry(seed: int) -> None:
    a, b = _random_xyxy(5, seed), _random_xyxy(6, seed + 1)
    iou, giou = box_iou(a, b), generalized_box_iou(a, b)
    assert (iou >= 0).all() and (iou <= 1 + 1e-6).all()
    assert (giou >= -1 - 1e-6).all() and (giou <= iou + 1e-6).all()
    torch.testing.assert_close(generalized_box_iou(b, a), giou.T)
    torch.testing.assert_close(generalized_box_iou(a, a).diagonal(), torch.ones(5))
    torch.testing.assert_close(box_xyxy_to_cxcywh(box_cxcywh_to_xyxy(a)), a)


def test_masks_to_boxes_pixel_edges_and_empty() -> None:
    masks = torch.zeros(3, 5, 7, dtype=torch.bool)
    masks[0, 1:3, 2:6] = True  # rows 1..2, cols 2..5
    masks[1, 4, 0] = True  # one pixel
    boxes = masks_to_boxes(masks)
    assert torch.equal(boxes[0], torch.tensor([2.0, 1.0, 6.0, 3.0]))
    assert torch.equal(boxes[1], torch.tensor([0.0, 4.0, 1.0, 5.0]))
    assert torch.equal(boxes[2], torch.zeros(4))
    assert box_area(boxes[0]).item() == masks[0].sum().item()


def test_masks_to_boxes_compiles_and_vmaps() -> None:
    masks = torch.rand(2, 4, 6, 8) > 0.7
    expected = masks_to_boxes(masks)
    torch.testing.assert_close(torch.func.vmap(masks_to_boxes)(masks), expected)
    compiled = torch.compile(generalized_box_iou, fullgraph=True, backend="eager")
    a, b = _random_xyxy(3, 5), _random_xyxy(2, 6)
    torch.testing.assert_close(compiled(a, b), generalized_box_iou(a, b))


def test_focal_loss_known_values() -> None:
    logits = torch.tensor([0.0, 0.0, math.log(3.0)])
    targets = torch.tensor([1.0, 0.0, 1.0])
    loss = sigmoid_focal_loss(logits, targets, alpha=0.25, gamma=2.0)
    # p = 0.5: 0.25 * 0.25 * ln 2 (positive), 0.75 * 0.25 * ln 2 (negative); p = 0.75 positive:
    # 0.25 * 0.0625 * ln(4/3).
    expected = torch.tensor([
        0.25 * 0.25 * math.log(2.0), 0.75 * 0.25 * math.log(2.0), 0.25 * 0.0625 * math.log(4 / 3)
    ])
    torch.testing.assert_close(loss, expected)
    plain = sigmoid_focal_loss(logits, targets, alpha=-1, gamma=0.0)
    torch.testing.assert_close(plain, torch.nn.functional.binary_cross_entropy_with_logits(
        logits, targets, reduction="none"))


def test_l1_dice_one_hot() -> None:
    assert l1_box_loss(torch.tensor([0.1, 0.2, 0.3, 0.4]), torch.tensor([0.2, 0.2, 0.1, 0.4])).item() == pytest.approx(0.3)
    big = torch.full((1, 4), 50.0)
    assert dice_loss(big, torch.ones(1, 4)).item() == pytest.approx(0.0, abs=1e-6)
    assert dice_loss(-big, torch.ones(1, 4)).item() == pytest.approx(0.8, abs=1e-4)  # (0+1)/(4+1)
    onehot = one_hot_targets(torch.tensor([0, 2, 3]), 3, dtype=torch.float32)
    assert torch.equal(onehot, torch.tensor([[1.0, 0, 0], [0, 0, 1], [0, 0, 0]]))


def test_inverse_sigmoid_roundtrip_and_finite() -> None:
    x = torch.tensor([0.0, 0.3, 0.5, 1.0])
    out = inverse_sigmoid(x)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[1:3].sigmoid(), x[1:3])
