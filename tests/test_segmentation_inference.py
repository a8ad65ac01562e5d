"""Mask-classification inference on hand-built logits: semantic, instance, panoptic, resizing."""

from __future__ import annotations

import torch

from clusterformer.tasks.seg_inference import (
    instance_inference,
    masks_to_original,
    panoptic_inference,
    semantic_inference,
)

BIG = 20.0


def _logits(probs: list[list[float]]) -> torch.Tensor:
    """Class logits whose softmax is ``probs`` (rows sum to 1, last column = no object)."""
    return torch.tensor(probs).clamp_min(1e-9).log()


def _masks(*regions: tuple[slice, slice], size: tuple[int, int] = (4, 6)) -> torch.Tensor:
    out = torch.full((len(regions), *size), -BIG)
    for i, (rows, cols) in enumerate(regions):
        out[i, rows, cols] = BIG
    return out


def test_semantic_is_weighted_vote_without_no_object() -> None:
    cls = _logits([[0.9, 0.05, 0.05], [0.1, 0.6, 0.3]])
    masks = _masks((slice(0, 4), slice(0, 3)), (slice(0, 4), slice(2, 6)))
    scores = semantic_inference(cls, masks)
    assert scores.shape == (2, 4, 6)
    label = scores.argmax(0)
    assert (label[:, :2] == 0).all() and (label[:, 3:] == 1).all()
    assert (label[:, 2] == 0).all()  # overlap: 0.9 beats 0.6
    assert torch.allclose(scores[0, 0, 0], torch.tensor(0.9), atol=1e-4)
    assert torch.allclose(scores[1, 0, 5], torch.tensor(0.6), atol=1e-4)


def test_instance_top_k_scores_masks_and_boxes() -> None:
    cls = _logits([[0.7, 0.2, 0.1], [0.1, 0.5, 0.4]])
    mask = torch.full((2, 4, 6), -BIG)
    mask[0, 1:3, 1:4] = BIG
    mask[1, 0:2, 4:6] = 0.5  # inside, probability sigmoid(0.5)
    pred = instance_inference(cls, mask, top_k=3)
    assert pred["labels"].tolist() == [0, 1, 1]  # (q0, c0) 0.7, (q1, c1) 0.5, (q0, c1) 0.2
    assert pred["masks"].shape == (3, 4, 6) and pred["masks"].dtype == torch.bool
    expected = torch.tensor([0.7, 0.5 * torch.sigmoid(torch.tensor(0.5)).item(), 0.2])
    assert torch.allclose(pred["scores"], expected, atol=1e-4)
    assert pred["boxes"][0].tolist() == [1.0, 1.0, 4.0, 3.0]
    assert pred["boxes"][1].tolist() == [4.0, 0.0, 6.0, 2.0]
    assert instance_inference(cls, mask, top_k=100)["scores"].shape == (4,)  # Q * C


def test_instance_empty_mask_scores_zero() -> None:
    pred = instance_inference(_logits([[0.9, 0.1]]), torch.full((1, 3, 3), -BIG))
    assert pred["scores"].item() == 0.0 and pred["boxes"].tolist() == [[0.0, 0.0, 0.0, 0.0]]


def test_panoptic_thresholds_overlap_and_stuff_merging() -> None:
    # classes: 0 thing, 1 stuff; column 2 = no object
    cls = _logits([
        [0.95, 0.03, 0.02],  # thing A, left block
        [0.02, 0.9, 0.08],   # stuff, right half
        [0.02, 0.85, 0.13],  # same stuff class, bottom-left row -> merged with the one above
        [0.5, 0.1, 0.4],     # score 0.5 < 0.8: dropped
        [0.01, 0.01, 0.98],  # no object: dropped
        [0.9, 0.05, 0.05],   # thing B, mostly covered by A: kept area / mask area < 0.8
    ])
    masks = _masks(
        (slice(0, 3), slice(0, 3)), (slice(0, 4), slice(3, 6)), (slice(3, 4), slice(0, 3)),
        (slice(0, 4), slice(0, 6)), (slice(0, 4), slice(0, 6)), (slice(0, 3), slice(0, 2)),
    )
    out = panoptic_inference(cls, masks, torch.tensor([True, False]))
    seg, segments = out["panoptic"], out["segments"]
    assert seg.dtype == torch.int32 and seg.shape == (4, 6)
    assert [(s["id"], s["category_id"], s["isthing"]) for s in segments] == [(1, 0, True), (2, 1, False)]
    assert (seg[:3, :3] == 1).all() and (seg[:, 3:] == 2).all() and (seg[3, :3] == 2).all()
    assert abs(segments[0]["score"] - 0.95) < 1e-4


def test_panoptic_nothing_kept_is_all_void() -> None:
    out = panoptic_inference(_logits([[0.1, 0.9]]), torch.zeros(1, 3, 3), torch.tensor([True]))
    assert out["segments"] == [] and (out["panoptic"] == 0).all()


def test_masks_to_original_undoes_padding_and_resize() -> None:
    # A 10 x 7 image (ceil / 4: 3 x 2 real tokens) padded into a 4 x 3 token grid.
    real = torch.randn(2, 3, 2)
    padded = torch.full((2, 4, 3), 7.0)
    padded[:, :3, :2] = real
    a = masks_to_original(padded, (10, 7), (20, 14))
    b = masks_to_original(real, (10, 7), (20, 14))
    assert a.shape == (2, 20, 14) and torch.equal(a, b)
    constant = masks_to_original(torch.full((1, 3, 2), 3.0), (10, 7), (5, 9))
    assert constant.shape == (1, 5, 9) and torch.allclose(constant, torch.tensor(3.0))
