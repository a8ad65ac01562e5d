"""Invariants of ``ops.feature_dispatching`` (Eq. 6), checked as hypothesis properties against
a per-pixel loop of the docstring's formula."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from ops_kit import PROPS, mlp_for, rand

from clusterformer.ops import feature_dispatching


def dispatch_reference(features, centers, alpha, beta, mlp):
    """Per-pixel loop straight from the formula of feature_dispatching's docstring."""
    k = centers.shape[0]
    rows = []
    for f in features:
        sim = torch.sigmoid(beta + alpha * F.cosine_similarity(centers, f[None], dim=-1))
        best = sim.argmax()
        rows.append(f + mlp(sim[best] * centers[best] / k))
    return torch.stack(rows)


@st.composite
def dispatch_case(draw):
    # D >= 2: in one dimension every cosine is +-1, so argmax ties are certain.
    dim = draw(st.integers(2, 6))
    seed = draw(st.integers(0, 2**16))
    return dict(
        features=rand(seed, draw(st.integers(1, 9)), dim),
        centers=rand(seed + 1, draw(st.integers(1, 5)), dim),
        alpha=torch.tensor(draw(st.floats(0.1, 5.0)), dtype=torch.float64),
        beta=torch.tensor(draw(st.floats(-2.0, 2.0)), dtype=torch.float64),
        mlp=mlp_for(dim, seed + 2), seed=seed,
    )


def dispatch(case, features=None, centers=None):
    return feature_dispatching(
        case["features"] if features is None else features,
        case["centers"] if centers is None else centers,
        alpha=case["alpha"], beta=case["beta"], mlp=case["mlp"],
    )


@PROPS
@given(case=dispatch_case())
def test_dispatching_matches_per_pixel_formula(case):
    expected = dispatch_reference(case["features"], case["centers"], case["alpha"], case["beta"],
                                  case["mlp"])
    torch.testing.assert_close(dispatch(case), expected)


@PROPS
@given(case=dispatch_case())
def test_dispatching_pixel_depends_only_on_itself_and_its_best_center(case):
    features, centers = case["features"], case["centers"]
    out = dispatch(case)
    for n in range(features.shape[0]):
        torch.testing.assert_close(dispatch(case, features=features[n : n + 1])[0], out[n])
        best = F.cosine_similarity(centers, features[n][None], dim=-1).argmax()
        # Any other center pointed away from the pixel stays non-best and must not matter.
        others = torch.arange(centers.shape[0]) != best
        moved = torch.where(others[:, None], -features[n] * 3.0, centers)
        if others.any():
            torch.testing.assert_close(dispatch(case, features=features[n : n + 1],
                                                centers=moved)[0], out[n])


@PROPS
@given(case=dispatch_case())
def test_dispatching_equivariant_to_pixels_invariant_to_centers(case):
    gen = torch.Generator().manual_seed(case["seed"])
    pix = torch.randperm(case["features"].shape[0], generator=gen)
    cen = torch.randperm(case["centers"].shape[0], generator=gen)
    out = dispatch(case)
    torch.testing.assert_close(dispatch(case, features=case["features"][pix]), out[pix])
    torch.testing.assert_close(dispatch(case, centers=case["centers"][cen]), out)
