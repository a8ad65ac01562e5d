"""The windowed clustering mixer: windowing, masking and the dispatching variants."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from clusterformer.models.mixer import (
    CENTER_UPDATES,
    DISPATCHINGS,
    ClusteringMixer,
    Dispatch,
    window_merge,
    window_partition,
)


@settings(max_examples=20, deadline=None)
@given(height=st.integers(1, 20), width=st.integers(1, 20), window=st.integers(1, 8))
def test_window_partition_round_trip(height: int, width: int, window: int) -> None:
    x = torch.randn(2, height, width, 3)
    tokens, mask, grid = window_partition(x, None, window)
    nh, nw = -(-height // window), -(-width // window)
    assert grid == (nh, nw) and tokens.shape == (2, nh * nw, window * window, 3)
    assert torch.equal(window_merge(tokens, grid, (height, width)), x)
    # The window mask marks exactly the real tokens (all of them when nothing is padded).
    assert int(mask.sum()) == 2 * height * width
    marked = window_merge(mask.flatten(-2).unsqueeze(-1).float(), grid, (height, width))
    assert marked.all()


@pytest.mark.parametrize("center_update", list(CENTER_UPDATES))
def test_padded_tokens_never_change_real_outputs(center_update: str) -> None:
    torch.manual_seed(0)
    mixer = ClusteringMixer(32, head_dim=16, window_size=5, center_grid=(2, 2),
                            center_update=center_update)
    x = torch.randn(1, 9, 12, 32)
    mask = torch.ones(1, 9, 12, dtype=torch.bool)
    mask[:, 6:, :] = False
    mask[:, :, 8:] = False
    garbage = x.clone()
    garbage[~mask.unsqueeze(-1).expand_as(x)] = 1e3
    with torch.no_grad():
        ref = mixer(x, mask)
        out = mixer(garbage, mask)
        alone = mixer(x[:, :6, :8])
    real = mask.unsqueeze(-1).expand_as(x)
    assert torch.allclose(ref[real], out[real], atol=1e-5)
    # Same windows over the real part as the cropped map (window 5 tiles 6x8 from the origin).
    assert torch.allclose(ref[:, :6, :8], alone, atol=1e-5)


def test_all_true_mask_equals_no_mask() -> None:
    torch.manual_seed(0)
    mixer = ClusteringMixer(16, head_dim=8, window_size=4, center_grid=(2, 2))
    x = torch.randn(2, 8, 12, 16)
    with torch.no_grad():
        assert torch.allclose(mixer(x), mixer(x, torch.ones(2, 8, 12, dtype=torch.bool)),
                              atol=1e-6)


@pytest.mark.parametrize("mode", DISPATCHINGS)
def test_dispatch_shapes_and_parameters(mode: str) -> None:
    dispatch = Dispatch(16, mode)
    features = torch.randn(3, 10, 16)
    centers = torch.randn(3, 4, 16, requires_grad=True)
    out = dispatch(features, centers)
    assert out.shape == features.shape and torch.isfinite(out).all()
    out.sum().backward()
    assert centers.grad is not None and centers.grad.abs().max() > 0
    names = {name.split(".")[0] for name, _ in dispatch.named_parameters()}
    expected = {"ours": {"alpha", "beta", "mlp"}, "none": set(), "fc": {"fc"},
                "confidence": {"alpha", "mlp"}, "fc_similarity": {"alpha", "beta", "fc"}}
    assert names == expected[mode]


def test_bad_options_are_rejected() -> None:
    with pytest.raises(ValueError, match="center_update"):
        ClusteringMixer(16, center_update="nope")
    with pytest.raises(ValueError, match="m_step"):
        ClusteringMixer(16, head_dim=8, m_step="median")
    with pytest.raises(ValueError, match="dispatching"):
        Dispatch(16, "nope")


def test_no_query_bias_where_it_cancels_and_old_checkpoints_with_one_still_load(tmp_path):
    from safetensors.torch import save_file

    from clusterformer.engine.checkpoint_format import encode_metadata
    from clusterformer.engine.checkpoint_load import load_weights
    from clusterformer.models import create_model

    assert ClusteringMixer(64, center_update="recurrent").q.bias is None
    assert ClusteringMixer(64, center_update="vanilla_attention").q.bias is not None
    torch.manual_seed(0)
    model = create_model("clusterformer-nano", num_classes=3).eval()
    assert not [n for n, _ in model.named_parameters() if n.endswith("mixer.q.bias")]
    # A checkpoint made when the query had a bias: its q.bias tensors load and are dropped.
    legacy = dict(model.state_dict())
    for name, module in model.named_modules():
        if getattr(module, "legacy_state_keys", ()):
            legacy[f"{name}.q.bias"] = torch.randn(module.q.weight.shape[0])
    again = create_model("clusterformer-nano", num_classes=3).eval()
    again.load_state_dict(legacy, strict=True)  # timm's and torch's loaders
    path = tmp_path / "legacy.safetensors"
    save_file({k: v.contiguous() for k, v in legacy.items()}, str(path),
              metadata=encode_metadata({}))
    third = create_model("clusterformer-nano", num_classes=3).eval()
    load_weights(third, path)  # cf's loader
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(again(images), model(images))
        torch.testing.assert_close(third(images), model(images))
