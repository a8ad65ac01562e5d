"""ClusterFormer backbone, registry and ``cf models`` (timm-style model tests)."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from clusterformer.models import (
    CENTER_UPDATES,
    DISPATCHINGS,
    Architecture,
    BackboneOptions,
    ClusterFormer,
    create_model,
    list_models,
    register_architecture,
    register_task_model,
    registry,
)

PRESETS = ["clusterformer-nano", "clusterformer-tiny",
           pytest.param("clusterformer-small", marks=pytest.mark.slow)]


def _nano(**overrides: object) -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model("clusterformer-nano", num_classes=7, **overrides)


def _assert_all_grads(model: torch.nn.Module) -> None:
    for name, param in model.named_parameters():
        assert param.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(param.grad).all(), f"{name} has a non-finite gradient"
        assert param.grad.abs().max() > 0, f"{name} has an all-zero gradient"


def test_list_models() -> None:
    assert list_models() == ["clusterformer-nano", "clusterformer-tiny", "clusterformer-small"]


@pytest.mark.parametrize("name", PRESETS)
def test_forward_logits_at_two_sizes(name: str) -> None:
    torch.manual_seed(0)
    model = create_model(name, num_classes=11).eval()
    with torch.no_grad():
        for size in [(224, 224), (203, 317)]:
            logits = model(torch.randn(1, 3, *size))
            assert logits.shape == (1, 11)
            assert torch.isfinite(logits).all()


@pytest.mark.parametrize("name", PRESETS)
def test_backward_reaches_every_parameter(name: str) -> None:
    torch.manual_seed(0)
    model = create_model(name, num_classes=5).train()
    logits = model(torch.randn(2, 3, 224, 224))
    torch.nn.functional.cross_entropy(logits, torch.tensor([1, 3])).backward()
    _assert_all_grads(model)


def test_tiny_parameter_count() -> None:
    with torch.device("meta"):
        model = create_model("clusterformer-tiny")
    params = sum(p.numel() for p in model.parameters())
    assert 28e6 <= params <= 32e6, params


def test_nano_is_cpu_sized() -> None:
    params = sum(p.numel() for p in create_model("clusterformer-nano").parameters())
    assert 2e5 <= params <= 2.5e6, params


@pytest.mark.parametrize("size", [(224, 224), (203, 317), (33, 47), (17, 23)])
def test_forward_pyramid_shapes_and_strides(size: tuple[int, int]) -> None:
    model = _nano().eval()
    assert model.feature_strides == (4, 8, 16, 32)
    assert model.feature_channels == (32, 64, 128, 256)
    with torch.no_grad():
        feats, masks = model.forward_pyramid(torch.randn(2, 3, *size))
    assert len(feats) == 4 and masks == [None] * 4
    for feat, dim, stride in zip(feats, model.feature_channels, model.feature_strides, strict=True):
        assert feat.shape == (2, dim, math.ceil(size[0] / stride), math.ceil(size[1] / stride))


@settings(max_examples=8, deadline=None)
@given(height=st.integers(1, 90), width=st.integers(1, 90))
def test_any_size_works(height: int, width: int) -> None:
    model = _NANO_EVAL
    with torch.no_grad():
        logits = model(torch.randn(1, 3, height, width))
    assert logits.shape == (1, 7) and torch.isfinite(logits).all()


_NANO_EVAL = _nano().eval()


def _pad(image: torch.Tensor, height: int, width: int, fill: str = "zeros"):
    """Images (B, 3, h, w) placed top-left on a (B, 3, height, width) canvas + its mask."""
    batch, _, h, w = image.shape
    shape = (batch, 3, height, width)
    canvas = torch.zeros(shape) if fill == "zeros" else torch.randn(shape) * 5
    canvas[..., :h, :w] = image
    mask = torch.zeros(batch, height, width, dtype=torch.bool)
    mask[:, :h, :w] = True
    return canvas, mask


@pytest.mark.parametrize("fill", ["zeros", "noise"])
@pytest.mark.parametrize("size", [(50, 70), (203, 117), (9, 13)])
def test_padding_invariance(size: tuple[int, int], fill: str) -> None:
    """Bottom/right padding with a pixel mask changes nothing on the real part.

    Exact (up to float rounding) by construction: padded pixels are zeroed before the stem
    and before every stride-2 conv (what the conv's own zero padding gives the unpadded
    image), masks are `any`-pooled, coordinates use each image's real extent, and
    GroupNorm, window centers, clustering and the pooled head ignore masked tokens.
    Whatever the padded pixels hold ("noise") must not matter either.
    """
    model = _NANO_EVAL
    torch.manual_seed(1)
    image = torch.randn(1, 3, *size)
    padded, mask = _pad(image, size[0] + 37, size[1] + 61, fill)
    with torch.no_grad():
        ref_feats, _ = model.forward_pyramid(image)
        feats, masks = model.forward_pyramid(padded, mask)
        assert torch.allclose(model(image), model(padded, mask), atol=1e-5)
    for ref, feat, m in zip(ref_feats, feats, masks, strict=True):
        h, w = ref.shape[-2:]
        assert torch.allclose(ref, feat[..., :h, :w], atol=1e-5)
        assert m[:, :h, :w].all() and m.sum() == h * w
        assert (feat * ~m.unsqueeze(1)).abs().max() == 0  # padded positions are zeroed


def test_batch_of_differently_sized_images_matches_singles() -> None:
    model = _NANO_EVAL
    torch.manual_seed(2)
    a, b = torch.randn(1, 3, 40, 64), torch.randn(1, 3, 72, 30)
    pa, ma = _pad(a, 72, 64)
    pb, mb = _pad(b, 72, 64)
    with torch.no_grad():
        batched = model(torch.cat([pa, pb]), torch.cat([ma, mb]))
        singles = torch.cat([model(a), model(b)])
    assert torch.allclose(batched, singles, atol=1e-5)


@pytest.mark.parametrize(
    "options",
    [{"center_update": c} for c in CENTER_UPDATES]
    + [{"dispatching": d} for d in DISPATCHINGS]
    + [{"m_step": "mean"}, {"num_iters": 1, "head_dim": 16}, {"head_pool": "concat"},
       {"window_size": 4, "center_grid": [2, 2]}],
    ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()),
)
def test_ablation_options_train(options: dict) -> None:
    model = _nano(**options).train()
    images = torch.randn(2, 3, 48, 56)
    mask = torch.ones(2, 48, 56, dtype=torch.bool)
    mask[1, 30:, :] = False
    logits = model(images, mask)
    assert logits.shape == (2, 7) and torch.isfinite(logits).all()
    logits.square().mean().backward()
    _assert_all_grads(model)


def test_drop_path_is_stochastic_in_training_only() -> None:
    model = _nano(drop_path_rate=0.5, layer_scale_init=1.0)
    rates = [blk.drop_path.rate for stage in model.stages for blk in stage]
    assert rates[0] == 0.0 and rates[-1] == pytest.approx(0.5) and rates == sorted(rates)
    images = torch.randn(4, 3, 32, 32)
    torch.manual_seed(3)
    outs = [model.train()(images) for _ in range(4)]
    assert any(not torch.allclose(outs[0], o) for o in outs[1:])
    with torch.no_grad():
        assert torch.equal(model.eval()(images), model(images))


def test_head_variants() -> None:
    concat = _nano(head_pool="concat")
    # timm's names: num_features = channels of forward_features' map, head_hidden_size = the
    # pooled width the classifier reads (all four stages for the concat head).
    assert concat.num_features == 256 and concat.head_hidden_size == sum(concat.feature_channels)
    features = create_model("clusterformer-nano", num_classes=0)
    with torch.no_grad():
        assert features(torch.randn(2, 3, 32, 32)).shape == (2, 256)
        feats, _ = concat.forward_pyramid(torch.randn(2, 3, 32, 32))
        assert concat.forward_head(feats).shape == (2, 7)
        assert concat.forward_head(feats, pre_logits=True).shape == (2, 480)
        with pytest.raises(ValueError, match="concat.*pools all 4 stages"):
            concat.forward_head(feats[-1])


def test_compiles_without_graph_breaks() -> None:
    """Dynamo traces the whole model as one graph (backend "eager": no codegen, fast)."""
    torch._dynamo.reset()
    model = _NANO_EVAL
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    images, mask = _pad(torch.randn(1, 3, 40, 50), 48, 64)
    with torch.no_grad():
        assert torch.allclose(compiled(images, mask), model(images, mask), atol=1e-5)
        assert torch.allclose(compiled(images), model(images), atol=1e-5)


@pytest.mark.slow
def test_inductor_compile_matches_eager() -> None:
    torch._dynamo.reset()
    model = _NANO_EVAL
    compiled = torch.compile(model, fullgraph=True)
    images, mask = _pad(torch.randn(2, 3, 40, 50), 48, 64)
    with torch.no_grad():
        assert torch.allclose(compiled(images, mask), model(images, mask), atol=1e-4)


def test_model_config_rebuilds_the_model() -> None:
    model = create_model("clusterformer-nano", num_classes=3, center_grid=[2, 2], m_step="mean")
    config = json.loads(json.dumps(model.model_config))
    assert config == {"name": "clusterformer-nano", "task": "classification", "num_classes": 3,
                      "center_grid": [2, 2], "m_step": "mean"}
    rebuilt = create_model(**config)
    rebuilt.load_state_dict(model.state_dict())
    images = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(rebuilt.eval()(images), model.eval()(images))
    assert model.default_cfg["mean"] == (0.485, 0.456, 0.406)
    assert model.default_cfg["input_size"] == (3, 224, 224)
    assert isinstance(model, ClusterFormer)


def test_a_new_task_can_register_its_architecture() -> None:
    """create_model builds a task that registered an architecture; an unknown one is refused,
    and so is a second architecture under a taken name unless it replaces it on purpose."""
    from clusterformer.registry import DuplicateNameError

    wide = Architecture(lambda num_classes, backbone=None, **options: ClusterFormer(
        num_classes=num_classes + 1, **options))  # fmt: skip
    register_architecture("wide-classifier", wide)
    try:
        register_task_model("counting", "wide-classifier")
        model = create_model("clusterformer-nano", task="counting", num_classes=4)
        assert model.num_classes == 5 and model.model_config["task"] == "counting"
        with pytest.raises(ValueError, match="unknown architecture"):
            register_task_model("captioning", "transformer-decoder")
        with pytest.raises(DuplicateNameError, match="'detector' is already registered"):
            register_architecture("detector", wide)
        with pytest.raises(DuplicateNameError, match="task 'counting' is already registered"):
            register_task_model("counting", "detector")
        register_task_model("counting", "classifier", replace=True)
        assert create_model("clusterformer-nano", task="counting", num_classes=4).num_classes == 4
    finally:
        registry.TASK_ARCHITECTURES.unregister("counting")
        registry.ARCHITECTURES.unregister("wide-classifier")


def test_backbone_options_are_the_backbone_constructors() -> None:
    """model.backbone in a training config names ClusterFormer's own arguments."""
    import dataclasses
    import inspect

    params = set(inspect.signature(ClusterFormer.__init__).parameters)
    assert {f.name for f in dataclasses.fields(BackboneOptions)} <= params


def test_create_model_errors() -> None:
    with pytest.raises(ValueError, match="clusterformer-nano.*clusterformer-tiny"):
        create_model("clusterformer-huge")
    with pytest.raises(ValueError, match="unknown task"):
        create_model("clusterformer-nano", task="captioning")
    with pytest.raises(TypeError, match="windw_size"):
        create_model("clusterformer-nano", windw_size=7)
    with pytest.raises(ValueError, match="center_update"):
        create_model("clusterformer-nano", center_update="spectral")
    with pytest.raises(ValueError, match="dispatching"):
        create_model("clusterformer-nano", dispatching="magic")
    with pytest.raises(ValueError, match="head_dim"):
        create_model("clusterformer-nano", head_dim=24)
    with pytest.raises(ValueError, match="num_classes"):
        create_model("clusterformer-nano", num_classes=-1)


def test_cf_models_cli() -> None:
    run = [sys.executable, "-m", "clusterformer.cli", "models"]
    table = subprocess.run(run + ["--image-size", "64"], capture_output=True, text=True, timeout=600)
    assert table.returncode == 0, table.stderr
    for name in list_models():
        assert name in table.stdout
    assert "GFLOPs @64" in table.stdout and "matmul+conv" in table.stdout
    out = subprocess.run(run + ["--json"], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    every = json.loads(out.stdout)
    rows = {row["name"]: row for row in every if row["kind"] == "preset"}
    assert list(rows) == list_models()
    assert {"name": "timm/<name>", "kind": "family"}.items() <= every[len(rows)].items()
    tiny = rows["clusterformer-tiny"]
    assert 28 <= tiny["params_m"] <= 32 and tiny["depths"] == [2, 2, 6, 2]
    assert 0 < rows["clusterformer-nano"]["gflops"] < tiny["gflops"] < rows["clusterformer-small"]["gflops"]


def test_timm_model_api() -> None:
    """timm's model API on the model itself (no timm needed): the unpooled map, the head with
    and without pooling, reset_classifier, intermediates, pruning, factory device/dtype."""
    model = _nano().eval()
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        maps, _ = model.forward_pyramid(x)
        feats = model.forward_features(x)
        assert feats.shape == (2, model.num_features, 2, 3) and torch.equal(feats, maps[-1])
        pre = model.forward_head(feats, pre_logits=True)
        assert pre.shape == (2, model.head_hidden_size)
        assert torch.allclose(model.head(pre), model(x), atol=1e-6)
        model.reset_classifier(0)
        assert model.num_classes == 0 and torch.allclose(model(x), pre, atol=1e-6)
        model.reset_classifier(5, "")  # per position: a map of logits
        assert model(x).shape == (2, 5, 2, 3) and model.get_classifier().out_features == 5
        model.reset_classifier(5, "avg")
        assert model(x).shape == (2, 5)
        last, inter = model.forward_intermediates(x)
        assert torch.equal(last, feats)
        assert all(torch.equal(a, b) for a, b in zip(inter, maps, strict=True))
        ends = model.forward_intermediates(x, indices=[0, -1], intermediates_only=True)
        assert [t.shape[1] for t in ends] == [32, 256]
        early = model.forward_intermediates(x, indices=[1], stop_early=True,
                                            intermediates_only=True)  # fmt: skip
        assert torch.equal(early[0], maps[1])
    with pytest.raises(ValueError, match="out of range"):
        model.forward_intermediates(x, indices=[4])
    with pytest.raises(ValueError, match="unknown global_pool"):
        model.reset_classifier(3, "max")
    with pytest.raises(ValueError, match="needs head_pool='last'"):
        _nano(head_pool="concat", global_pool="")
    # Pruning to stage 1 keeps its parameters only, and forward ends there.
    assert model.prune_intermediate_layers([1]) == [1]
    assert len(model.stages) == 2 and model.num_features == model.head_hidden_size == 64
    assert not any(n.startswith(("stages.2", "head")) for n, _ in model.named_parameters())
    with torch.no_grad():
        assert torch.equal(model(x), maps[1]) and model.feature_info[-1]["reduction"] == 8
    # Dropout before the classifier, training only; the factory arguments place and cast.
    dropped = _nano(drop_rate=0.5).train()
    assert not torch.equal(dropped(x), dropped(x))
    meta = ClusterFormer(depths=(1, 1, 1, 1), dims=(32, 64, 96, 128), device="meta",
                         dtype=torch.bfloat16)  # fmt: skip
    assert all(p.is_meta and p.dtype == torch.bfloat16 for p in meta.parameters())
