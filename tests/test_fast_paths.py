"""The unmasked fast paths give the numbers of the masked (padded) paths.

Every fast path is a Python branch taken when no mask is given (and, in the mixer, when the map
is whole windows): an all-True mask must give the same outputs through the general code. Also
activation checkpointing (same loss and gradients) and the task-level switch that drops a mask
with no padded pixel.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from model_kit import perturb, rel_diff
from torch import Tensor, nn

import clusterformer.models.backbone as backbone_module
import clusterformer.models.mixer as mixer_module
from clusterformer.models import CENTER_UPDATES, DISPATCHINGS, ClusteringMixer, create_model
from clusterformer.models.layers import masked_group_norm
from clusterformer.tasks import build_task

RTOL = 1e-5  # max |fast - general| / max |general|


# --- ClusteringMixer ---------------------------------------------------------------------------


@pytest.mark.parametrize("dispatching", DISPATCHINGS)
@pytest.mark.parametrize("center_update", list(CENTER_UPDATES))
def test_mixer_whole_window_fast_path_equals_masked_path(center_update, dispatching, monkeypatch):
    torch.manual_seed(0)
    mixer = perturb(ClusteringMixer(32, head_dim=16, window_size=7, center_grid=(3, 3),
                                    center_update=center_update, dispatching=dispatching), 1)
    x = torch.randn(2, 14, 21, 32)  # 2 x 3 whole windows
    mask = torch.ones(2, 14, 21, dtype=torch.bool)
    partitions = []
    original = mixer_module.window_partition
    monkeypatch.setattr(mixer_module, "window_partition",
                        lambda *a: partitions.append(1) or original(*a))
    with torch.no_grad():
        fast = mixer(x)
        assert not partitions, "mask=None on whole windows did not take the fast path"
        general = mixer(x, mask)
        assert partitions, "an explicit mask did not take the padded path"
    assert fast.shape == general.shape == x.shape
    assert fast.is_contiguous()
    assert rel_diff(fast, general) <= RTOL


def test_mixer_fast_path_reads_a_permuted_map():
    # A (B, H, W, C) view of a channels-first tensor has other strides: same numbers.
    torch.manual_seed(0)
    mixer = perturb(ClusteringMixer(32, head_dim=16, window_size=7), 2)
    channels_first = torch.randn(2, 32, 14, 14)
    with torch.no_grad():
        permuted = mixer(channels_first.permute(0, 2, 3, 1))
        contiguous = mixer(channels_first.permute(0, 2, 3, 1).contiguous())
    assert permuted.is_contiguous()
    assert rel_diff(permuted, contiguous) <= RTOL


def test_mixer_without_mask_on_a_padded_size_equals_all_true_mask():
    # 10 x 13 is not whole windows: mask=None takes the padded path with an implicit mask.
    torch.manual_seed(0)
    mixer = perturb(ClusteringMixer(32, head_dim=16, window_size=7), 3)
    x = torch.randn(2, 10, 13, 32)
    with torch.no_grad():
        assert rel_diff(mixer(x), mixer(x, torch.ones(2, 10, 13, dtype=torch.bool))) <= RTOL


# --- ClusterFormer backbone --------------------------------------------------------------------


@pytest.fixture(scope="module")
def nano() -> nn.Module:
    torch.manual_seed(0)
    return perturb(create_model("clusterformer-nano", num_classes=5), 4).eval()


@pytest.mark.parametrize("size", [(224, 224), (203, 317)], ids=["224-whole", "203x317-padded"])
def test_backbone_all_true_mask_equals_no_mask(nano, size):
    # Block by block on one shared input, not end to end: dispatching keeps each pixel's best
    # center (an argmax), so rounding noise of ~1e-7 (another thread split of a reduction) can
    # flip a near-tie in one block and move every later stage by ~1e-3.
    torch.manual_seed(1)
    images = torch.randn(1, 3, *size)
    inputs: dict[str, list[Tensor]] = {"fast": [], "general": []}
    run = ["fast"]
    blocks = [block for stage in nano.stages for block in stage]
    hooks = [b.register_forward_pre_hook(lambda m, a: inputs[run[0]].append(a[0])) for b in blocks]
    try:
        with torch.no_grad():
            nano.forward_pyramid(images)
            run[0] = "general"
            nano.forward_pyramid(images, torch.ones(1, *size, dtype=torch.bool))
    finally:
        for hook in hooks:
            hook.remove()
    # Up to the first block (coordinates, stem) nothing is discrete: equal to rounding.
    assert rel_diff(inputs["fast"][0], inputs["general"][0]) <= RTOL
    with torch.no_grad():
        for i, (block, x) in enumerate(zip(blocks, inputs["fast"], strict=True)):
            all_true = torch.ones(x.shape[:-1], dtype=torch.bool)
            assert rel_diff(block(x), block(x, all_true)) <= RTOL, f"block {i}"


@pytest.mark.parametrize("masked", [False, True], ids=["no-mask", "mask"])
def test_forward_pyramid_documented_shapes(nano, masked):
    height, width = 75, 103
    images = torch.randn(2, 3, height, width)
    mask = torch.ones(2, height, width, dtype=torch.bool)
    mask[1, 50:, :] = False
    with torch.no_grad():
        feats, masks = nano.forward_pyramid(images, mask if masked else None)
        # timm's forward_features: the last map alone, unpooled.
        assert torch.equal(nano.forward_features(images), nano.forward_pyramid(images)[0][-1])
    assert len(feats) == len(masks) == 4
    for feat, m, dim, stride in zip(feats, masks, nano.feature_channels, nano.feature_strides,
                                    strict=True):
        size = (math.ceil(height / stride), math.ceil(width / stride))
        assert feat.shape == (2, dim, *size)
        # Documented: channels-last memory (the downsampling convs read it as is).
        assert feat.is_contiguous(memory_format=torch.channels_last)
        if masked:
            assert m.shape == (2, *size) and m.dtype == torch.bool
            assert m[0].all() and not m[1].all()
            assert (feat * ~m.unsqueeze(1)).abs().max() == 0  # padded positions zeroed
        else:
            assert m is None


@pytest.mark.parametrize("masked", [False, True], ids=["no-mask", "mask"])
def test_grad_checkpointing_gives_the_same_loss_and_gradients(monkeypatch, masked):
    # drop_path_rate > 0: the recomputation in backward must redraw the same drop-path masks.
    torch.manual_seed(0)
    model = perturb(create_model("clusterformer-nano", num_classes=3, drop_path_rate=0.2), 5)
    model.train()
    images = torch.randn(2, 3, 40, 56)
    mask = None
    if masked:
        mask = torch.ones(2, 40, 56, dtype=torch.bool)
        mask[0, :, 44:] = False
    labels = torch.tensor([0, 2])

    def loss_and_grads():
        torch.manual_seed(7)
        loss = F.cross_entropy(model(images, mask), labels)
        return loss, torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)

    plain_loss, plain_grads = loss_and_grads()
    calls = []
    original = backbone_module.checkpoint
    monkeypatch.setattr(backbone_module, "checkpoint",
                        lambda *a, **k: calls.append(1) or original(*a, **k))
    model.set_grad_checkpointing(True)
    ckpt_loss, ckpt_grads = loss_and_grads()
    assert len(calls) == 4, "each of the 4 stages should run under checkpoint"
    assert rel_diff(ckpt_loss, plain_loss) <= RTOL
    for (name, _), plain, ckpt in zip(model.named_parameters(), plain_grads, ckpt_grads,
                                      strict=True):
        assert ckpt is not None, f"{name} got no gradient with checkpointing"
        assert torch.isfinite(ckpt).all(), name
        assert rel_diff(ckpt, plain) <= RTOL, name


def test_grad_checkpointing_is_off_in_eval_and_without_grad(monkeypatch):
    calls = []
    original = backbone_module.checkpoint
    monkeypatch.setattr(backbone_module, "checkpoint",
                        lambda *a, **k: calls.append(1) or original(*a, **k))
    model = create_model("clusterformer-nano", num_classes=3)
    model.set_grad_checkpointing(True)
    images = torch.randn(1, 3, 32, 32)
    model.eval()(images)
    with torch.no_grad():
        model.train()(images)
    assert calls == []


# --- Task.forward drops a mask with no padding -------------------------------------------------


class Recorder(nn.Module):
    """Records the pixel_mask argument it was called with."""

    def __init__(self) -> None:
        super().__init__()
        self.masks: list[Tensor | None] = []

    def forward(self, images: Tensor, pixel_mask: Tensor | None = None) -> Tensor:
        self.masks.append(pixel_mask)
        return images.mean(dim=(2, 3))


def test_task_forward_drops_an_all_true_mask_and_keeps_a_padded_one():
    task, model = build_task("classification", 3), Recorder()
    images = torch.randn(2, 3, 8, 8)
    full = torch.ones(2, 8, 8, dtype=torch.bool)
    padded = full.clone()
    padded[1, 6:, :] = False
    task.forward(model, {"images": images, "pixel_mask": full})
    task.forward(model, {"images": images, "pixel_mask": padded})
    task.forward(model, {"images": images})
    assert model.masks[0] is None
    assert model.masks[1] is padded
    assert model.masks[2] is None


# --- masked_group_norm without a mask -----------------------------------------------------------


@settings(max_examples=25, deadline=None)
# At least 2 channels: F.group_norm refuses a map of one single value (1x1x1x1), which no
# model here has (channels >= 8).
@given(shape=st.tuples(st.integers(1, 3), st.integers(1, 6), st.integers(1, 6), st.integers(2, 8)),
       permuted=st.booleans(), seed=st.integers(0, 2**16))
def test_masked_group_norm_without_mask_is_a_layer_norm(shape, permuted, seed):
    batch, height, width, dim = shape
    # Groups of 16+ values (a model's have thousands): in a group of two or three near-equal
    # values the variance is mostly rounding, and the two kernels' rounding differs by ~1e-5.
    assume(height * width * dim >= 16)
    generator = torch.Generator().manual_seed(seed)
    if permuted:  # the (B, H, W, C) view of a channels-first tensor
        x = torch.randn(batch, dim, height, width, generator=generator).permute(0, 2, 3, 1)
    else:
        x = torch.randn(batch, height, width, dim, generator=generator)
    x = 3 * x + 1  # a mean and a scale to remove
    weight, bias = torch.randn(dim, generator=generator), torch.randn(dim, generator=generator)
    want = F.layer_norm(x, x.shape[1:]) * weight + bias
    got = masked_group_norm(x, weight, bias, None)
    assert got.shape == x.shape
    assert rel_diff(got, want) <= RTOL
    # The masked formula with an all-True mask is the same layer norm.
    masked = masked_group_norm(x, weight, bias, torch.ones(batch, height, width, dtype=torch.bool))
    assert rel_diff(masked, want) <= RTOL
