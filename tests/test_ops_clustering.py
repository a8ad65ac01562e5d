"""Invariants of the clustering ops (README, "The clustering ops"), checked as hypothesis
properties."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from ops_kit import PROPS, lead_shapes, mlp_for, rand, rand_mask

from clusterformer.ops import (
    ASSIGNMENTS,
    cross_attention_clustering_step,
    feature_dispatching,
    init_centers,
    recurrent_cross_attention_clustering,
)


def linear_params(seed: int, dim: int, bias: bool = True) -> dict[str, torch.Tensor | None]:
    params: dict[str, torch.Tensor | None] = {}
    for i, name in enumerate("qkv"):
        params[f"{name}_weight"] = rand(seed + i, dim, dim) / dim**0.5
        params[f"{name}_bias"] = rand(seed + 10 + i, dim) if bias else None
    return params


def identity_values(lead: tuple[int, ...], n: int) -> torch.Tensor:
    """Values ``v = I`` make the step return its assignment matrix ``M`` itself."""
    return torch.eye(n, dtype=torch.float64).expand(*lead, n, n)


# --- cross_attention_clustering_step -------------------------------------------------------


@PROPS
@given(lead=lead_shapes, k=st.integers(1, 6), n=st.integers(1, 10), d=st.integers(1, 6),
       seed=st.integers(0, 2**16), masked=st.booleans())
def test_each_real_pixel_spreads_unit_mass_over_centers(lead, k, n, d, seed, masked):
    q, keys = rand(seed, *lead, k, d), rand(seed + 1, *lead, n, d)
    mask = rand_mask(seed + 2, *lead, n) if masked else None
    assignment = cross_attention_clustering_step(q, keys, identity_values(lead, n), mask=mask)
    mass = assignment.sum(dim=-2)  # (..., N)
    expected = torch.ones_like(mass) if mask is None else mask.to(mass.dtype)
    torch.testing.assert_close(mass, expected)
    assert (assignment >= 0).all()


@PROPS
@given(k=st.integers(1, 5), n=st.integers(2, 10), d=st.integers(1, 6),
       seed=st.integers(0, 2**16), assignment=st.sampled_from(ASSIGNMENTS),
       m_step=st.sampled_from(["sum", "mean"]))
def test_masked_pixels_never_move_a_center(k, n, d, seed, assignment, m_step):
    q, keys, v = rand(seed, k, d), rand(seed + 1, n, d), rand(seed + 2, n, d)
    mask = rand_mask(seed + 3, n)
    noisy_keys = torch.where(mask[:, None], keys, 100 * rand(seed + 4, n, d))
    noisy_v = torch.where(mask[:, None], v, 100 * rand(seed + 5, n, d))
    kwargs = dict(mask=mask, assignment=assignment, m_step=m_step)
    torch.testing.assert_close(
        cross_attention_clustering_step(q, keys, v, **kwargs),
        cross_attention_clustering_step(q, noisy_keys, noisy_v, **kwargs),
    )


def test_scale_none_means_inverse_sqrt_dim():
    q, k, v = rand(0, 3, 8), rand(1, 5, 8), rand(2, 5, 8)
    torch.testing.assert_close(
        cross_attention_clustering_step(q, k, v),
        cross_attention_clustering_step(q, k, v, scale=8**-0.5),
    )
    reference = torch.softmax(q @ k.T / 8**0.5, dim=0) @ v  # the paper's literal sum M-step
    torch.testing.assert_close(cross_attention_clustering_step(q, k, v), reference)


def test_mean_m_step_is_weighted_average_of_values():
    q, k, v = rand(0, 3, 4), rand(1, 6, 4), rand(2, 6, 4)
    weights = torch.softmax(q @ k.T / 2, dim=0)
    expected = (weights @ v) / weights.sum(-1, keepdim=True)
    torch.testing.assert_close(cross_attention_clustering_step(q, k, v, m_step="mean"), expected)


def test_ablation_assignments():
    q, k = rand(0, 3, 4), rand(1, 6, 4)
    eye = identity_values((), 6)
    argmax = cross_attention_clustering_step(q, k, eye, assignment="argmax")
    assert torch.equal(argmax.sum(0), torch.ones(6, dtype=torch.float64))
    assert torch.equal(argmax.argmax(0), (q @ k.T).argmax(0))
    pixels = cross_attention_clustering_step(q, k, eye, assignment="softmax_pixels")
    torch.testing.assert_close(pixels.sum(-1), torch.ones(3, dtype=torch.float64))
    cosine = cross_attention_clustering_step(q, k, eye, assignment="cosine")
    assert (cosine >= 0).all() and (cosine <= 1 + 1e-12).all()
    with pytest.raises(ValueError, match="unknown assignment"):
        cross_attention_clustering_step(q, k, eye, assignment="nope")
    with pytest.raises(ValueError, match="unknown m_step"):
        cross_attention_clustering_step(q, k, eye, m_step="nope")


def test_softmax_over_pixels_ignores_padding():
    q, k = rand(0, 2, 4), rand(1, 5, 4)
    mask = torch.tensor([True, False, True, True, False])
    weights = cross_attention_clustering_step(
        q, k, identity_values((), 5), mask=mask, assignment="softmax_pixels"
    )
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, dtype=torch.float64))
    assert (weights[:, ~mask] == 0).all()


def rand_attn(seed: int, *shape: int) -> torch.Tensor:
    """Random per-center attention mask ``(..., K, N)``; some pixels no center may take."""
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed)) > 0.5


@PROPS
@given(lead=lead_shapes, k=st.integers(1, 5), n=st.integers(1, 10), d=st.integers(1, 6),
       seed=st.integers(0, 2**16), assignment=st.sampled_from(ASSIGNMENTS),
       m_step=st.sampled_from(["sum", "mean"]), padded=st.booleans())
def test_attn_mask_keeps_every_center_to_its_own_pixels(lead, k, n, d, seed, assignment,
                                                         m_step, padded):
    q, keys, v = rand(seed, *lead, k, d), rand(seed + 1, *lead, n, d), rand(seed + 2, *lead, n, d)
    attn = rand_attn(seed + 3, *lead, k, n)
    mask = rand_mask(seed + 4, *lead, n) if padded else None
    kwargs = dict(mask=mask, assignment=assignment, m_step=m_step, attn_mask=attn)
    weights = cross_attention_clustering_step(q, keys, identity_values(lead, n), **kwargs)
    allowed = attn if mask is None else attn & mask.unsqueeze(-2)
    assert (weights[~allowed] == 0).all()  # a disallowed pair has no assignment
    # ... so what a center may not take can change arbitrarily without moving it.
    noisy_v = torch.where(allowed.any(-2).unsqueeze(-1), v, 100 * rand(seed + 5, *lead, n, d))
    torch.testing.assert_close(cross_attention_clustering_step(q, keys, v, **kwargs),
                               cross_attention_clustering_step(q, keys, noisy_v, **kwargs))
    if assignment == "softmax_centers" and m_step == "sum":  # a pixel's mass goes to its centers
        taken = allowed.any(-2)
        torch.testing.assert_close(weights.sum(-2), taken.to(weights.dtype))


@PROPS
@given(lead=lead_shapes, k=st.integers(1, 5), n=st.integers(1, 10), d=st.integers(1, 6),
       seed=st.integers(0, 2**16), assignment=st.sampled_from(ASSIGNMENTS),
       m_step=st.sampled_from(["sum", "mean"]))
def test_attn_mask_of_all_true_changes_nothing(lead, k, n, d, seed, assignment, m_step):
    q, keys, v = rand(seed, *lead, k, d), rand(seed + 1, *lead, n, d), rand(seed + 2, *lead, n, d)
    mask = rand_mask(seed + 3, *lead, n)
    kwargs = dict(mask=mask, assignment=assignment, m_step=m_step)
    everything = torch.ones(*lead, k, n, dtype=torch.bool)
    torch.testing.assert_close(
        cross_attention_clustering_step(q, keys, v, attn_mask=everything, **kwargs),
        cross_attention_clustering_step(q, keys, v, **kwargs),
    )


@PROPS
@given(k=st.integers(1, 5), n=st.integers(1, 10), d=st.integers(1, 6),
       seed=st.integers(0, 2**16), assignment=st.sampled_from(["softmax_pixels", "cosine"]),
       m_step=st.sampled_from(["sum", "mean"]))
def test_attn_mask_per_center_equals_clustering_its_pixels_alone(k, n, d, seed, assignment,
                                                                 m_step):
    # Without competition between centers (softmax over pixels, cosine), masking center k's
    # pairs is clustering center k over its own pixels with a padding mask.
    q, keys, v = rand(seed, k, d), rand(seed + 1, n, d), rand(seed + 2, n, d)
    attn = rand_attn(seed + 3, k, n)
    got = cross_attention_clustering_step(q, keys, v, attn_mask=attn, assignment=assignment,
                                          m_step=m_step)
    for center in range(k):
        if not attn[center].any():
            assert (got[center] == 0).all()
            continue
        alone = cross_attention_clustering_step(q[center:center + 1], keys, v, mask=attn[center],
                                                assignment=assignment, m_step=m_step)
        torch.testing.assert_close(got[center:center + 1], alone)


# --- recurrent_cross_attention_clustering -------------------------------------------------


@st.composite
def clustering_case(draw):
    heads = draw(st.integers(1, 3))
    return dict(
        lead=draw(lead_shapes), k=draw(st.integers(1, 5)), n=draw(st.integers(1, 10)),
        heads=heads, dim=heads * draw(st.integers(1, 4)), iters=draw(st.integers(0, 3)),
        seed=draw(st.integers(0, 2**16)), bias=draw(st.booleans()),
    )


def run_recurrent(case, features, centers, mask=None, **kwargs):
    return recurrent_cross_attention_clustering(
        features, centers, linear_params(case["seed"], case["dim"], case["bias"]),
        num_iters=case["iters"], num_heads=case["heads"], mask=mask, **kwargs,
    )


def case_tensors(case):
    lead, dim, seed = case["lead"], case["dim"], case["seed"]
    return rand(seed + 20, *lead, case["n"], dim), rand(seed + 21, *lead, case["k"], dim)


@PROPS
@given(case=clustering_case())
def test_centers_invariant_to_pixel_permutation(case):
    features, centers = case_tensors(case)
    mask = rand_mask(case["seed"] + 22, *case["lead"], case["n"])
    perm = torch.randperm(case["n"], generator=torch.Generator().manual_seed(case["seed"]))
    torch.testing.assert_close(
        run_recurrent(case, features, centers, mask),
        run_recurrent(case, features[..., perm, :], centers, mask[..., perm]),
    )


@PROPS
@given(case=clustering_case())
def test_recurrent_attn_mask_is_the_step_attn_mask_at_every_iteration(case):
    features, centers = case_tensors(case)
    attn = rand_attn(case["seed"] + 23, *case["lead"], case["k"], case["n"])
    torch.testing.assert_close(run_recurrent(case, features, centers, attn_mask=attn),
                               unrolled(case, features, centers, attn_mask=attn.unsqueeze(-3)))


@PROPS
@given(case=clustering_case())
def test_centers_equivariant_to_center_permutation(case):
    features, centers = case_tensors(case)
    perm = torch.randperm(case["k"], generator=torch.Generator().manual_seed(case["seed"]))
    torch.testing.assert_close(
        run_recurrent(case, features, centers)[..., perm, :],
        run_recurrent(case, features, centers[..., perm, :]),
    )


@PROPS
@given(case=clustering_case())
def test_zero_iterations_returns_initial_centers(case):
    features, centers = case_tensors(case)
    assert torch.equal(run_recurrent({**case, "iters": 0}, features, centers), centers)


def unrolled(case, features, centers, **step_kwargs):
    """``num_iters`` steps with the same projections, written out: what the op must equal."""
    p = linear_params(case["seed"], case["dim"], case["bias"])
    heads, dim = case["heads"], case["dim"]

    def split(x):  # (..., L, D) -> (..., h, L, d)
        return x.unflatten(-1, (heads, dim // heads)).transpose(-3, -2)

    keys, values = split(F.linear(features, p["k_weight"], p["k_bias"])), split(
        F.linear(features, p["v_weight"], p["v_bias"]))
    expected = centers
    for _ in range(case["iters"]):
        queries = split(F.linear(expected, p["q_weight"], p["q_bias"]))
        update = cross_attention_clustering_step(queries, keys, values, **step_kwargs)
        expected = expected + update.transpose(-3, -2).flatten(-2)
    return expected


@PROPS
@given(case=clustering_case())
def test_recurrent_equals_unrolled_steps_with_shared_weights(case):
    features, centers = case_tensors(case)
    torch.testing.assert_close(run_recurrent(case, features, centers),
                               unrolled(case, features, centers))


def test_missing_bias_keys_mean_no_bias_and_bad_heads_raise():
    features, centers = rand(0, 6, 4), rand(1, 2, 4)
    full = linear_params(3, 4, bias=False)
    weights_only = {k: v for k, v in full.items() if v is not None}
    torch.testing.assert_close(
        recurrent_cross_attention_clustering(features, centers, full, num_iters=2),
        recurrent_cross_attention_clustering(features, centers, weights_only, num_iters=2),
    )
    with pytest.raises(ValueError, match="divisible"):
        recurrent_cross_attention_clustering(features, centers, full, num_iters=1, num_heads=3)


def test_ops_do_not_write_into_inputs():
    features, centers = rand(0, 2, 7, 4), rand(1, 2, 3, 4)
    mask = rand_mask(2, 2, 7)
    params = linear_params(3, 4)
    before = [t.clone() for t in (features, centers, mask)]
    versions = [t._version for t in (features, centers, mask)]
    recurrent_cross_attention_clustering(features, centers, params, num_iters=3, num_heads=2,
                                         mask=mask)
    alpha, beta = torch.tensor(2.0, dtype=torch.float64), torch.tensor(0.5, dtype=torch.float64)
    feature_dispatching(features, centers, alpha=alpha, beta=beta, mlp=mlp_for(4, 5))
    init_centers(features.transpose(-1, -2).unflatten(-1, (7, 1)), (2, 1))
    for t, old, version in zip((features, centers, mask), before, versions, strict=True):
        assert torch.equal(t, old) and t._version == version


# --- init_centers -------------------------------------------------------------------------


@PROPS
@given(lead=lead_shapes, d=st.integers(1, 4), gh=st.integers(1, 3), gw=st.integers(1, 3),
       ch=st.integers(1, 3), cw=st.integers(1, 3), seed=st.integers(0, 2**16))
def test_init_centers_are_cell_means(lead, d, gh, gw, ch, cw, seed):
    features = rand(seed, *lead, d, gh * ch, gw * cw)
    mask = rand_mask(seed + 1, *lead, gh * ch, gw * cw)
    cells = features.unflatten(-2, (gh, ch)).unflatten(-1, (gw, cw))  # (..., D, gh, ch, gw, cw)
    cell_mask = mask.unflatten(-2, (gh, ch)).unflatten(-1, (gw, cw)).unsqueeze(-5)
    mean = cells.mean(dim=(-3, -1)).flatten(-2).transpose(-1, -2)
    torch.testing.assert_close(init_centers(features, (gh, gw)), mean)
    total = (cells * cell_mask).sum(dim=(-3, -1))
    count = cell_mask.sum(dim=(-3, -1)).clamp_min(1)
    masked_mean = (total / count).flatten(-2).transpose(-1, -2)
    torch.testing.assert_close(init_centers(features, (gh, gw), mask=mask), masked_mean)


@settings(max_examples=25, deadline=None)
@given(k=st.integers(1, 6), n=st.integers(1, 12), heads=st.integers(1, 2),
       seed=st.integers(0, 2**16), masked=st.booleans())
def test_query_bias_cancels_in_an_assignment_over_centers(k, n, heads, seed, masked):
    # b . k_n is the same for every center of pixel n: the softmax over centers cancels it, so
    # the op may leave it out. Applying it by hand (the old op) gives the same centers; under
    # a softmax over pixels it does change them, and there the op still applies it.
    dim = 4 * heads
    features, centers = rand(seed, 2, n, dim), rand(seed + 1, 2, k, dim)
    mask = rand_mask(seed + 2, 2, n) if masked else None
    weights = {name: rand(seed + 3 + i, dim, dim) for i, name in enumerate(("q", "k", "v"))}
    bias = rand(seed + 7, dim) * 3
    params = {"q_weight": weights["q"], "k_weight": weights["k"], "v_weight": weights["v"],
              "q_bias": bias}
    ours = recurrent_cross_attention_clustering(features, centers, params, num_iters=2,
                                                num_heads=heads, mask=mask)  # fmt: skip
    without = recurrent_cross_attention_clustering(
        features, centers, {**params, "q_bias": None}, num_iters=2, num_heads=heads, mask=mask)
    assert torch.equal(ours, without)  # not applied at all
    # The old op, by hand: queries with the bias, one softmax over centers per head.
    out = centers
    for _ in range(2):
        q = F.linear(out, weights["q"], bias).unflatten(-1, (heads, -1)).transpose(1, 2)
        keys = F.linear(features, weights["k"]).unflatten(-1, (heads, -1)).transpose(1, 2)
        values = F.linear(features, weights["v"]).unflatten(-1, (heads, -1)).transpose(1, 2)
        assign = torch.softmax(q @ keys.transpose(-1, -2) / (dim // heads) ** 0.5, dim=-2)
        if mask is not None:
            assign = assign * mask.unsqueeze(1).unsqueeze(1)
        out = out + (assign @ values).transpose(1, 2).flatten(-2)
    torch.testing.assert_close(ours, out, rtol=1e-9, atol=1e-9)
    if n < 2:
        return  # a softmax over one pixel is 1 whatever the bias
    pixels = recurrent_cross_attention_clustering(features, centers, params, num_iters=2,
                                                  num_heads=heads, assignment="softmax_pixels")
    assert not torch.allclose(pixels, recurrent_cross_attention_clustering(
        features, centers, {**params, "q_bias": None}, num_iters=2, num_heads=heads,
        assignment="softmax_pixels"))


@PROPS
@given(case=clustering_case(), masked=st.booleans(), low=st.sampled_from(["float32", "bfloat16"]))
def test_under_autocast_the_recurrence_trains_in_float32(case, masked, low):
    # bf16 rounding inside the recurrence stalled bf16 training (docs/benchmarks.md): when
    # gradients flow, the op computes under autocast exactly what it computes in float32 on
    # the float32 inputs, whatever dtype its inputs come in. Without gradients (inference) it
    # runs in the autocast dtype.
    features, centers = case_tensors(case)
    mask = rand_mask(case["seed"] + 22, *case["lead"], case["n"]) if masked else None
    dtype = getattr(torch, low)
    params = {name: None if value is None else value.to(dtype)
              for name, value in linear_params(case["seed"], case["dim"], case["bias"]).items()}

    def run(features, centers, params):
        return recurrent_cross_attention_clustering(
            features, centers, params, num_iters=case["iters"], num_heads=case["heads"], mask=mask)

    features, centers = features.to(dtype), centers.to(dtype)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        trained = run(features.clone().requires_grad_(), centers, params)
        with torch.no_grad():
            inferred = run(features, centers, params)
    as_float = {name: None if value is None else value.float() for name, value in params.items()}
    assert trained.dtype == torch.float32
    assert torch.equal(trained, run(features.float(), centers.float(), as_float))
    assert inferred.dtype == dtype  # bf16 inputs stay bf16 (float32 centers promote the sum)
