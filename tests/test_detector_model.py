"""The detector model: shapes at odd sizes, gradients, padding and batch invariance, options."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from clusterformer.models import create_model
from clusterformer.models.cluster_decoder import QUERY_INITS, box_sine_embedding
from clusterformer.models.detector import build_detector
from clusterformer.models.pixel_decoder import ms_deform_sample, sine_position_embedding
from clusterformer.models.registry import preset_config

SMALL = {"hidden_dim": 32, "decoder_heads": 2, "decoder_ffn_dim": 64, "num_queries": 12}


def _nano(**options):
    torch.manual_seed(0)
    return build_detector(3, **{**preset_config("clusterformer-nano"), **SMALL, **options})


def _perturb(model: torch.nn.Module) -> None:
    # Zero-initialised heads would make box outputs equal their references trivially.
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)


def _all_outputs(out: dict) -> list[torch.Tensor]:
    items = [out] + list(out["aux_outputs"]) + ([out["enc_outputs"]] if "enc_outputs" in out else [])
    return [t for o in items for t in (o["pred_logits"], o["pred_boxes"])]


@pytest.mark.parametrize("size", [(64, 64), (45, 77)])
def test_forward_shapes_and_every_parameter_gets_a_gradient(size: tuple[int, int]) -> None:
    model = _nano()
    out = model(torch.randn(2, 3, *size))
    assert out["pred_logits"].shape == (2, 12, 3)
    assert out["pred_boxes"].shape == (2, 12, 4)
    assert len(out["aux_outputs"]) == 5
    assert all(a["pred_boxes"].shape == (2, 12, 4) for a in out["aux_outputs"])
    assert ((out["pred_boxes"] >= 0) & (out["pred_boxes"] <= 1)).all()
    sum(t.float().square().mean() for t in _all_outputs(out)).backward()
    bad = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not bad, f"parameters without a finite gradient: {bad}"


@pytest.mark.parametrize("query_init", [q for q in QUERY_INITS if q != "feature_embedding"])
@pytest.mark.parametrize("pixel_decoder", ["fpn", "msdeform"])
def test_padding_invariance(query_init: str, pixel_decoder: str) -> None:
    model = _nano(query_init=query_init, pixel_decoder=pixel_decoder, pixel_decoder_layers=1).eval()
    _perturb(model)
    image = torch.randn(1, 3, 53, 70)
    padded = F.pad(image, (0, 26, 0, 11))
    mask = torch.zeros(1, 64, 96, dtype=torch.bool)
    mask[:, :53, :70] = True
    with torch.no_grad():
        plain, masked = model(image), model(padded, mask)
    for a, b in zip(_all_outputs(plain), _all_outputs(masked), strict=True):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)


def test_batch_of_differently_sized_images_equals_each_alone() -> None:
    model = _nano().eval()
    _perturb(model)
    first, second = torch.randn(1, 3, 48, 64), torch.randn(1, 3, 64, 40)
    batch = torch.zeros(2, 3, 64, 64)
    mask = torch.zeros(2, 64, 64, dtype=torch.bool)
    batch[0, :, :48, :64], mask[0, :48, :64] = first[0], True
    batch[1, :, :64, :40], mask[1, :64, :40] = second[0], True
    with torch.no_grad():
        together = model(batch, mask)
        alone = [model(first), model(second)]
    for i in range(2):
        torch.testing.assert_close(together["pred_logits"][i], alone[i]["pred_logits"][0], atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(together["pred_boxes"][i], alone[i]["pred_boxes"][0], atol=2e-5, rtol=1e-4)


def test_fewer_tokens_than_queries_gives_identical_blank_centers() -> None:
    model = _nano(num_queries=40).eval()  # 16x16 input: 4 + 1 + 1 = 6 tokens over 3 scales
    with torch.no_grad():
        out = model(torch.randn(1, 3, 16, 16))
    tail = out["pred_boxes"][0, 6:]
    assert torch.isfinite(out["pred_logits"]).all()
    torch.testing.assert_close(tail, tail[:1].expand_as(tail))


@pytest.mark.parametrize("options", [
    {"query_init": "feature_embedding", "num_queries": 12},
    {"query_init": "free", "iterative_refinement": False},
    {"decoder_m_step": "sum", "decoder_dispatching": "fc"},
    {"decoder_center_update": "vanilla_attention", "mask_features": True},
])
def test_options_run(options: dict) -> None:
    model = _nano(**options)
    out = model(torch.randn(1, 3, 40, 56))
    assert out["pred_boxes"].shape == (1, 12, 4)
    if options.get("mask_features"):
        assert out["mask_features"].shape == (1, 32, 10, 14)


def test_registry_builds_detection() -> None:
    model = create_model("clusterformer-nano", task="detection", num_classes=5)
    assert model.model_config["task"] == "detection"
    out = model(torch.randn(1, 3, 32, 32))
    assert out["pred_logits"].shape == (1, 100, 5)


def test_ms_deform_sample_reads_token_centres() -> None:
    value = torch.arange(12.0).view(1, 1, 3, 4)
    # token (row 1, col 2) has centre (x, y) = (2.5, 1.5); outside the map reads zero
    loc = torch.tensor([[2.5, 1.5], [0.5, 0.5], [-5.0, -5.0]]).view(1, 3, 1, 1, 2)
    out = ms_deform_sample([value], loc, torch.ones(1, 3, 1, 1))
    torch.testing.assert_close(out.flatten(), torch.tensor([6.0, 0.0, 0.0]))


def test_position_embeddings_follow_real_extent() -> None:
    mask = torch.zeros(1, 6, 8, dtype=torch.bool)
    mask[:, :4, :5] = True
    like = torch.zeros(())
    padded = sine_position_embedding(mask, (1, 6, 8), 16, like=like)
    plain = sine_position_embedding(None, (1, 4, 5), 16, like=like)
    torch.testing.assert_close(padded[..., :4, :5], plain)
    assert box_sine_embedding(torch.rand(2, 3, 4), 8).shape == (2, 3, 32)
