"""The Table S1 switches added for the ablation harness: criss-cross attention as a center update
(S1c), ClustSeg's scene-adaptive query initialisation (S1f) and a clustering head dimension of
its own (S1d). Each test fails on the code before them (the options did not exist)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from model_kit import perturb

from clusterformer.models import ClusteringMixer, create_model
from clusterformer.models.cluster_decoder import ClusterDecoder, _criss_cross_at
from clusterformer.ops import (
    criss_cross_mask,
    cross_attention_clustering_step,
    grid_cells,
    init_centers,
    recurrent_cross_attention_clustering,
)

PROPS = settings(max_examples=30, deadline=None)


def rand(seed: int, *shape: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# --- ops ------------------------------------------------------------------------------------


@PROPS
@given(height=st.integers(1, 9), width=st.integers(1, 9), k=st.integers(1, 4),
       seed=st.integers(0, 2**16))
def test_criss_cross_mask_is_the_row_band_or_the_column_band(height, width, k, seed):
    g = torch.Generator().manual_seed(seed)
    r0, c0 = torch.randint(0, height, (k,), generator=g), torch.randint(0, width, (k,), generator=g)
    r1 = r0 + torch.randint(1, height + 1, (k,), generator=g)
    c1 = c0 + torch.randint(1, width + 1, (k,), generator=g)
    mask = criss_cross_mask(r0, r1, c0, c1, (height, width))
    assert mask.shape == (k, height * width)
    for center in range(k):
        for y in range(height):
            for x in range(width):
                want = bool(r0[center] <= y < r1[center] or c0[center] <= x < c1[center])
                assert bool(mask[center, y * width + x]) == want


@PROPS
@given(height=st.integers(1, 9), width=st.integers(1, 9), gh=st.integers(1, 4),
       gw=st.integers(1, 4))
def test_grid_cells_are_the_cells_init_centers_pools(height, width, gh, gw):
    # One-hot features: center k's pooled vector is non-zero exactly on the pixels of its cell.
    onehot = torch.eye(height * width, dtype=torch.float64).view(height * width, height, width)
    support = init_centers(onehot, (gh, gw)) > 0  # (gh * gw, H * W)
    row_start, row_end, col_start, col_end = grid_cells((gh, gw), (height, width))
    rows = torch.arange(height).repeat_interleave(width)
    cols = torch.arange(width).repeat(height)
    in_row = (rows >= row_start[:, None]) & (rows < row_end[:, None])
    in_col = (cols >= col_start[:, None]) & (cols < col_end[:, None])
    assert torch.equal(support, in_row & in_col)


def test_criss_cross_step_is_attention_over_each_centers_cross_alone():
    q, k, v = rand(0, 4, 6), rand(1, 25, 6), rand(2, 25, 6)
    bands = grid_cells((2, 2), (5, 5))
    allowed = criss_cross_mask(*bands, (5, 5))
    got = cross_attention_clustering_step(q, k, v, assignment="softmax_pixels", attn_mask=allowed)
    for center in range(4):
        keep = allowed[center]
        alone = cross_attention_clustering_step(q[center:center + 1], k[keep], v[keep],
                                                assignment="softmax_pixels")
        torch.testing.assert_close(got[center:center + 1], alone)


@PROPS
@given(heads=st.integers(1, 3), value_width=st.integers(1, 3), qk_width=st.integers(1, 5),
       iters=st.integers(1, 3), n=st.integers(1, 8), k=st.integers(1, 4),
       seed=st.integers(0, 2**16))
def test_query_key_heads_of_their_own_width(heads, value_width, qk_width, iters, n, k, seed):
    dim = heads * value_width
    qk = heads * qk_width
    params = {"q_weight": rand(seed, qk, dim), "q_bias": rand(seed + 1, qk),
              "k_weight": rand(seed + 2, qk, dim), "k_bias": rand(seed + 3, qk),
              "v_weight": rand(seed + 4, dim, dim), "v_bias": rand(seed + 5, dim)}
    features, centers = rand(seed + 6, 2, n, dim), rand(seed + 7, 2, k, dim)
    got = recurrent_cross_attention_clustering(features, centers, params, num_iters=iters,
                                               num_heads=heads)

    def split(x, width):  # (..., L, h * width) -> (..., h, L, width)
        return x.unflatten(-1, (heads, width)).transpose(-3, -2)

    keys = split(F.linear(features, params["k_weight"], params["k_bias"]), qk_width)
    values = split(F.linear(features, params["v_weight"], params["v_bias"]), value_width)
    want = centers
    for _ in range(iters):
        queries = split(F.linear(want, params["q_weight"], params["q_bias"]), qk_width)
        logits = queries @ keys.transpose(-1, -2) / qk_width**0.5
        want = want + (torch.softmax(logits, dim=-2) @ values).transpose(-3, -2).flatten(-2)
    torch.testing.assert_close(got, want)


# --- the backbone mixer ---------------------------------------------------------------------


def test_criss_cross_mixer_center_ignores_pixels_outside_its_cross():
    torch.manual_seed(0)
    mixer = perturb(ClusteringMixer(16, head_dim=8, window_size=5, center_grid=(2, 2),
                                    center_update="criss_cross"), 1)
    tokens = torch.randn(1, 1, 25, 16)
    centers = torch.randn(1, 1, 4, 16)
    # Center 0 owns rows 0-2 and columns 0-2 of the 5x5 window: pixel (4, 4) is outside its
    # cross and inside the cross of center 3 (rows 2-4, columns 2-4).
    moved = tokens.clone()
    moved[0, 0, 4 * 5 + 4] += 5.0
    with torch.no_grad():
        before, after = mixer._cluster(tokens, centers, None), mixer._cluster(moved, centers, None)
    torch.testing.assert_close(before[0, 0, 0], after[0, 0, 0])
    assert not torch.allclose(before[0, 0, 3], after[0, 0, 3])
    # Plain vanilla attention over the whole window would move center 0 too.
    vanilla = perturb(ClusteringMixer(16, head_dim=8, window_size=5, center_grid=(2, 2),
                                      center_update="vanilla_attention"), 1)
    with torch.no_grad():
        assert not torch.allclose(vanilla._cluster(tokens, centers, None)[0, 0, 0],
                                  vanilla._cluster(moved, centers, None)[0, 0, 0])


def test_criss_cross_mixer_compiles_to_eager_numbers():
    torch._dynamo.reset()
    torch.manual_seed(0)
    mixer = perturb(ClusteringMixer(32, head_dim=16, window_size=7, center_grid=(3, 3),
                                    center_update="criss_cross"), 1)
    x = torch.randn(2, 11, 9, 32)
    mask = torch.ones(2, 11, 9, dtype=torch.bool)
    mask[1, 7:], mask[1, :, 6:] = False, False
    with torch.no_grad():
        want = mixer(x, mask)
        got = torch.compile(mixer, fullgraph=True, backend="inductor")(x, mask)
    torch._dynamo.reset()
    assert ((got - want).abs().max() / want.abs().max()).item() <= 1e-4


# --- the decoder ----------------------------------------------------------------------------


def test_decoder_criss_cross_is_the_reference_points_row_and_column_inside_the_image():
    # Two images on a 4x6 map; the second is real on 3x4 only. Points at (cx, cy) of the real
    # extent: the far corner (1, 1) must stay on the last real row and column.
    ref = torch.tensor([[[0.5, 0.1, 0.1, 0.1]], [[1.0, 1.0, 0.1, 0.1]]])
    mask = torch.ones(2, 4, 6, dtype=torch.bool)
    mask[1, 3:], mask[1, :, 4:] = False, False
    cross = _criss_cross_at(ref, mask, (4, 6)).view(2, 4, 6)
    want0 = torch.zeros(4, 6, dtype=torch.bool)
    want0[0], want0[:, 3] = True, True
    want1 = torch.zeros(4, 6, dtype=torch.bool)
    want1[2], want1[:, 3] = True, True
    assert torch.equal(cross[0], want0) and torch.equal(cross[1], want1)


def test_scene_adaptive_centers_pool_the_image_they_start_from():
    torch.manual_seed(0)
    decoder = ClusterDecoder(32, 4, num_queries=5, num_layers=1, num_heads=2, ffn_dim=32,
                             num_levels=1, query_init="scene_adaptive", box_head=False)
    # A uniform embedded map: every pooling map sums to one, so every center is that vector.
    embedded = torch.full((1, 12, 32), 0.3) + torch.arange(32.0) / 32
    content, ref = decoder._scene_adaptive(embedded, None, (3, 4))
    torch.testing.assert_close(content, decoder.embed_proj(embedded[:, :1]).expand(1, 5, 32))
    assert ((ref >= 0) & (ref <= 1)).all()
    # Different images start different centers (free parameters would not).
    other, _ = decoder._scene_adaptive(torch.randn(1, 12, 32), None, (3, 4))
    assert not torch.allclose(content, other)


@pytest.mark.parametrize("options", [
    {"query_init": "scene_adaptive"},
    {"decoder_center_update": "criss_cross"},
    {"decoder_head_dim": 24},
])
def test_panoptic_switch_trains_every_parameter(options):
    torch.manual_seed(0)
    model = create_model("clusterformer-nano", task="panoptic", num_classes=4, num_queries=6,
                         decoder_layers=3, **options)
    images = torch.randn(2, 3, 48, 40)
    mask = torch.ones(2, 48, 40, dtype=torch.bool)
    mask[1, 40:] = False
    out = model(images, mask)
    parts = [out, *out["aux_outputs"], *([out["enc_outputs"]] if "enc_outputs" in out else [])]
    sum(p["pred_logits"].square().mean() + p["pred_masks"].square().mean() for p in parts).backward()
    dead = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not dead, f"parameters without a finite gradient: {dead}"
