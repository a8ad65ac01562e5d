"""Point sampling ops: grid_sample reads, uniform and importance sampling."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from clusterformer.ops.points import importance_points, point_sample, uncertainty, uniform_points


def test_point_sample_reads_pixel_centres_exactly() -> None:
    maps = torch.arange(2 * 3 * 4 * 5, dtype=torch.float32).reshape(2, 3, 4, 5)
    ys, xs = torch.meshgrid(torch.arange(4), torch.arange(5), indexing="ij")
    coords = torch.stack([(xs + 0.5) / 5, (ys + 0.5) / 4], -1).reshape(1, -1, 2).expand(2, -1, -1)
    out = point_sample(maps, coords)
    assert out.shape == (2, 3, 20)
    assert torch.allclose(out, maps.flatten(2))


def test_point_sample_interpolates_and_is_zero_outside() -> None:
    row = torch.tensor([[[[0.0, 2.0]]]])  # (1, 1, 1, 2)
    coords = torch.tensor([[[0.5, 0.5], [2.0, 0.5]]])
    out = point_sample(row, coords)
    assert torch.allclose(out, torch.tensor([[[1.0, 0.0]]]))


def test_uniform_points_in_unit_square_and_seeded() -> None:
    a = uniform_points(3, 50, generator=torch.Generator().manual_seed(1))
    b = uniform_points(3, 50, generator=torch.Generator().manual_seed(1))
    assert a.shape == (3, 50, 2) and torch.equal(a, b)
    assert bool((a >= 0).all() and (a < 1).all())


def test_uncertainty_is_minus_abs() -> None:
    assert torch.equal(uncertainty(torch.tensor([-2.0, 0.0, 3.0])), torch.tensor([-2.0, 0.0, -3.0]))


def test_importance_points_concentrate_on_the_boundary() -> None:
    # Logit = x - 0.5 in a 1-D ramp: the boundary is the column x = 0.5.
    xs = (torch.arange(64, dtype=torch.float32) + 0.5) / 64
    logits = (xs - 0.5).mul(20).view(1, 1, 1, 64).expand(1, 1, 64, 64).contiguous()
    gen = torch.Generator().manual_seed(0)
    pts = importance_points(logits, 400, oversample_ratio=3, importance_sample_ratio=0.75, generator=gen)
    assert pts.shape == (1, 400, 2)
    important, rest = pts[0, :300, 0], pts[0, 300:, 0]
    assert (important - 0.5).abs().mean() < 0.15  # uniform would give 0.25
    assert (rest - 0.5).abs().mean() > 0.15


def test_importance_points_scale_reads_the_real_extent() -> None:
    # The left half of the map is the real image; the boundary there is at its x = 0.5.
    xs = (torch.arange(64, dtype=torch.float32) + 0.5) / 64
    logits = (xs - 0.25).mul(20).view(1, 1, 1, 64).expand(1, 1, 8, 64).contiguous()
    pts = importance_points(logits, 300, importance_sample_ratio=1.0, scale=torch.tensor([[0.5, 1.0]]),
                            generator=torch.Generator().manual_seed(0))
    assert (pts[0, :, 0] - 0.5).abs().mean() < 0.1


@settings(max_examples=20, deadline=None)
@given(num_points=st.integers(1, 40), ratio=st.floats(0.0, 1.0), over=st.floats(1.0, 4.0))
def test_importance_points_shape_and_range(num_points: int, ratio: float, over: float) -> None:
    logits = torch.randn(2, 1, 6, 7, generator=torch.Generator().manual_seed(num_points))
    pts = importance_points(logits, num_points, oversample_ratio=over, importance_sample_ratio=ratio)
    assert pts.shape == (2, num_points, 2)
    assert bool((pts >= 0).all() and (pts <= 1).all())
