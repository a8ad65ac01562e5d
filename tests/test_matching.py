"""Hungarian matching: optimality, permutation equivariance, empty images, batching."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from clusterformer.ops.boxes import box_xyxy_to_cxcywh
from clusterformer.ops.matching import detection_cost, focal_class_cost, hungarian_match


def _random_batch(seed: int, sizes: list[int], queries: int = 6, classes: int = 4):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(len(sizes), queries, classes, generator=g)
    xy = torch.rand(len(sizes), queries, 2, generator=g) * 0.6
    pred = box_xyxy_to_cxcywh(torch.cat([xy, xy + 0.05 + torch.rand(len(sizes), queries, 2, generator=g) * 0.3], -1))
    total = sum(sizes)
    labels = torch.randint(classes, (total,), generator=g)
    txy = torch.rand(total, 2, generator=g) * 0.6
    tgt = box_xyxy_to_cxcywh(torch.cat([txy, txy + 0.05 + torch.rand(total, 2, generator=g) * 0.3], -1))
    return logits, pred, labels, tgt


def _total(cost: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> float:
    return float(cost[rows, cols].sum())


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 10_000), st.integers(1, 4), st.integers(1, 4))
def test_optimal_against_brute_force(seed: int, queries: int, targets: int) -> None:
    cost = torch.rand(1, queries, targets, generator=torch.Generator().manual_seed(seed))
    (rows, cols), = hungarian_match(cost, [targets])
    assert len(rows) == min(queries, targets)
    assert len(set(rows.tolist())) == len(rows) and len(set(cols.tolist())) == len(cols)
    best = min(
        sum(float(cost[0, q, t]) for q, t in zip(perm, range(targets), strict=False))
        if queries >= targets
        else sum(float(cost[0, q, t]) for q, t in zip(range(queries), perm, strict=False))
        for perm in itertools.permutations(range(max(queries, targets)), min(queries, targets))
    )
    assert _total(cost[0], rows, cols) == pytest.approx(best, abs=1e-5)  # float32 sums


def test_detection_cost_weights_and_shape() -> None:
    logits, pred, labels, tgt = _random_batch(0, [2, 3])
    cost = detection_cost(logits, pred, labels, tgt)
    assert cost.shape == (2, 6, 5)
    only_l1 = detection_cost(logits, pred, labels, tgt, class_weight=0, giou_weight=0, l1_weight=1)
    torch.testing.assert_close(only_l1[0, 0, 0], (pred[0, 0] - tgt[0]).abs().sum())
    cls = detection_cost(logits, pred, labels, tgt, class_weight=1, giou_weight=0, l1_weight=0)
    torch.testing.assert_close(cls, focal_class_cost(logits, labels))
    # a confident correct class is cheaper than a confident wrong one
    confident = torch.full((1, 1, 2), -10.0)
    confident[0, 0, 1] = 10.0
    c = focal_class_cost(confident, torch.tensor([1, 0]))
    assert c[0, 0, 0] < c[0, 0, 1]


def test_matches_identical_predictions_exactly() -> None:
    tgt = torch.tensor([[0.2, 0.3, 0.1, 0.2], [0.7, 0.6, 0.3, 0.2], [0.5, 0.5, 0.4, 0.4]])
    labels = torch.tensor([1, 0, 2])
    order = torch.tensor([4, 0, 2])  # queries 4, 0, 2 predict targets 0, 1, 2
    pred = torch.full((1, 5, 4), 0.5)
    pred[0, 3] = torch.tensor([0.9, 0.1, 0.05, 0.05])
    pred[0, 1] = torch.tensor([0.1, 0.9, 0.05, 0.05])
    pred[0, order] = tgt
    logits = torch.full((1, 5, 3), -8.0)
    logits[0, order, labels] = 8.0
    (rows, cols), = hungarian_match(detection_cost(logits, pred, labels, tgt), [3])
    assert dict(zip(rows.tolist(), cols.tolist(), strict=True)) == {4: 0, 0: 1, 2: 2}


@settings(max_examples=20, deadline=None)
@given(st.integers(0, 10_000))
def test_permuting_targets_permutes_assignment(seed: int) -> None:
    logits, pred, labels, tgt = _random_batch(seed, [4])
    perm = torch.randperm(4, generator=torch.Generator().manual_seed(seed + 7))
    (r0, c0), = hungarian_match(detection_cost(logits, pred, labels, tgt), [4])
    (r1, c1), = hungarian_match(detection_cost(logits, pred, labels[perm], tgt[perm]), [4])
    # target perm[j] of the permuted list is original target perm[j]
    assert dict(zip(r0.tolist(), c0.tolist(), strict=True)) == {
        r: int(perm[c]) for r, c in zip(r1.tolist(), c1.tolist(), strict=True)
    }


def test_batched_equals_per_image_and_empty_images() -> None:
    sizes = [2, 0, 3, 0]
    logits, pred, labels, tgt = _random_batch(3, sizes)
    batched = hungarian_match(detection_cost(logits, pred, labels, tgt), sizes)
    start = 0
    for i, size in enumerate(sizes):
        single = hungarian_match(
            detection_cost(logits[i : i + 1], pred[i : i + 1], labels[start : start + size],
                           tgt[start : start + size]), [size]
        )[0]
        start += size
        assert torch.equal(batched[i][0], single[0]) and torch.equal(batched[i][1], single[1])
        assert batched[i][0].dtype == torch.int64 and len(batched[i][0]) == size
    empty = hungarian_match(torch.zeros(2, 5, 0), [0, 0])
    assert all(len(r) == 0 and len(c) == 0 for r, c in empty)


def test_more_targets_than_queries_and_nonfinite_costs() -> None:
    cost = torch.rand(1, 2, 5)
    cost[0, 0, 1] = float("nan")
    cost[0, 1, 3] = float("inf")
    (rows, cols), = hungarian_match(cost, [5])
    assert len(rows) == 2 and sorted(rows.tolist()) == [0, 1]
    with pytest.raises(ValueError, match="sizes"):
        hungarian_match(torch.zeros(2, 3, 4), [1, 2])
