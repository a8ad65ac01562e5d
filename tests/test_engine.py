"""Engine parts: optimizer groups, schedules, the train step (loss falls, accumulation, AMP,
EMA), classification loss / mixup, top-k metrics, and config resolution."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from clusterformer.engine import checkpoint as ckpt
from clusterformer.engine.checkpoint import ModelEma, TrainState
from clusterformer.engine.config_files import read_recipe, resolve_config
from clusterformer.engine.evaluate import autocast
from clusterformer.engine.hooks import EmaHook
from clusterformer.engine.optim import Schedule, build_optimizer, param_groups
from clusterformer.engine.step import make_scaler, train_step
from clusterformer.metrics import TopKAccumulator, topk_accuracy, topk_correct
from clusterformer.tasks import build_task
from clusterformer.tasks.classification import mix_batch, smooth_one_hot


def classifier_task(num_classes: int = 4, **options: object):  # noqa: ANN201
    return build_task("classification", num_classes, **options)


class TinyNet(nn.Module):
    """(B, 3, H, W) -> (B, C): conv, GroupNorm, a layer scale, pooled linear head."""

    def __init__(self, num_classes: int = 4) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(2, 8))
        self.ls1 = nn.Parameter(torch.ones(8))
        self.head = nn.Linear(8, num_classes)

    def forward(self, images: torch.Tensor, pixel_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = self.backbone(images) * self.ls1[:, None, None]
        return self.head(x.mean((2, 3)))


def _batch(n: int = 8, size: int = 16, num_classes: int = 4, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "images": torch.randn(n, 3, size, size, generator=g),
        "pixel_mask": torch.ones(n, size, size, dtype=torch.bool),
        "labels": torch.randint(num_classes, (n,), generator=g),
        "keys": [f"k{i}" for i in range(n)],
    }


def _state(model: nn.Module, *, lr: float = 1e-2, total: int = 100, **kw) -> TrainState:
    opt = build_optimizer(model, lr=lr, weight_decay=0.05)
    return TrainState(
        model=model,
        module=model,
        optimizer=opt,
        schedule=Schedule(total, 0, "constant"),
        device=torch.device("cpu"),
        **kw,
    )


def test_param_groups_no_decay_and_backbone_multiplier() -> None:
    model = TinyNet()
    groups = param_groups(model, lr=1.0, weight_decay=0.05, backbone_lr_mult=0.1)
    by_param = {id(p): g for g in groups for p in g["params"]}
    names = dict(model.named_parameters())
    assert by_param[id(names["backbone.0.weight"])]["weight_decay"] == 0.05
    assert by_param[id(names["backbone.0.weight"])]["lr"] == pytest.approx(0.1)
    for no_decay in ("backbone.0.bias", "backbone.1.weight", "ls1", "head.bias"):
        assert by_param[id(names[no_decay])]["weight_decay"] == 0.0, no_decay
    assert by_param[id(names["head.weight"])]["weight_decay"] == 0.05
    assert by_param[id(names["head.weight"])]["lr"] == 1.0
    assert sum(len(g["params"]) for g in groups) == len(names)


def test_optimizer_is_fused_on_cpu_and_a_resume_keeps_this_runs_implementation(tmp_path) -> None:
    model = TinyNet()
    state = _state(model)
    assert all(g["fused"] for g in state.optimizer.param_groups)
    twin = copy.deepcopy(model)
    reference = torch.optim.AdamW(param_groups(twin, lr=1e-2, weight_decay=0.05), lr=1e-2,
                                  weight_decay=0.05, fused=False)  # fmt: skip
    for _ in range(3):
        for p, q in zip(model.parameters(), twin.parameters(), strict=True):
            p.grad = torch.randn_like(p)
            q.grad = p.grad.clone()
        state.optimizer.step()
        reference.step()
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(p, q)  # the default implementation's update
    # A checkpoint made by a for-loop optimizer (before fused, or on another device) carries
    # fused=None in its groups: the resumed run stays fused.
    old = _state(TinyNet())
    for group in old.optimizer.param_groups:
        group["fused"] = None
    saved = old.state_dict(rngs=[], world_size=1)
    weights = ckpt.save_checkpoint(tmp_path, weights=old.module, metadata={}, state=saved, step=0)
    state.load_state_dict(saved, weights, rank=0)
    assert all(g["fused"] for g in state.optimizer.param_groups)


def test_schedule_warmup_cosine_poly() -> None:
    cos = Schedule(110, 10, "cosine", min_ratio=0.01)
    assert cos.factor(0) == pytest.approx(1 / 11)
    assert cos.factor(9) == pytest.approx(10 / 11)
    assert cos.factor(10) == pytest.approx(1.0)
    assert cos.factor(60) == pytest.approx(0.01 + 0.99 * 0.5)
    assert cos.factor(110) == pytest.approx(0.01)
    poly = Schedule(100, 0, "poly", power=1.0)
    assert poly.factor(50) == pytest.approx(0.5)
    factors = [cos.factor(s) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(factors, factors[1:], strict=False))
    with pytest.raises(ValueError, match="schedule"):
        Schedule(10, 0, "step")


def test_loss_falls_on_fixed_batch_real_model() -> None:
    torch.manual_seed(0)
    task = classifier_task(label_smoothing=0.0)
    model = task.build_model("clusterformer-nano")
    state = _state(model, lr=2e-3, grad_clip=1.0)
    batch = _batch(8, 32)
    losses = [train_step(state, task, [batch])["loss"] for _ in range(12)]
    assert state.step == 12
    assert losses[-1] < 0.5 * losses[0], losses


def test_accumulation_equals_full_batch() -> None:
    task = classifier_task(label_smoothing=0.1)
    batch = _batch(8)
    halves = [{k: v[:4] for k, v in batch.items()}, {k: v[4:] for k, v in batch.items()}]
    torch.manual_seed(1)
    a = TinyNet()
    b = TinyNet()
    b.load_state_dict(a.state_dict())
    sa, sb = _state(a), _state(b)
    for _ in range(3):
        la = train_step(sa, task, [batch])
        lb = train_step(sb, task, halves)
    assert la["loss"] == pytest.approx(lb["loss"], rel=1e-5)
    for (name, pa), pb in zip(a.named_parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6, msg=name)


def test_grad_clip_bounds_update_and_reports_norm() -> None:
    task = classifier_task(label_smoothing=0.0)
    model = TinyNet()
    out = train_step(_state(model, grad_clip=1e-3), task, [_batch()])
    assert out["grad_norm"] > 1e-3  # reported before clipping


def test_amp_bf16_on_cpu_and_fp16_needs_cuda() -> None:
    task = classifier_task()
    out = train_step(_state(TinyNet(), amp="bf16"), task, [_batch()])
    assert math.isfinite(out["loss"])
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="fp16 needs a CUDA"):
            make_scaler("fp16", torch.device("cpu"))
        with pytest.raises(ValueError, match="fp16 needs a CUDA"):
            autocast("fp16", torch.device("cpu"))


def test_ema_tracks_weights() -> None:
    model = TinyNet()
    ema = ModelEma(model, decay=0.5)
    before = ema.module.head.weight.clone()
    state = _state(model, ema=ema)
    train_step(state, classifier_task(), [_batch()])
    EmaHook().after_step(type("Trainer", (), {"state": state})())
    expected = 0.5 * before + 0.5 * model.head.weight.detach()
    torch.testing.assert_close(ema.module.head.weight, expected)
    assert not any(p.requires_grad for p in ema.module.parameters())


def test_mixup_cutmix_soft_targets() -> None:
    labels = torch.tensor([0, 1, 2, 3])
    targets = smooth_one_hot(labels, 4, 0.1)
    torch.testing.assert_close(targets.sum(1), torch.ones(4))
    assert targets[0, 0] == pytest.approx(0.925)
    images = torch.randn(4, 3, 8, 8)
    original = images.clone()
    g = torch.Generator().manual_seed(0)
    for mix, cut in ((0.8, 0.0), (0.0, 1.0), (0.8, 1.0)):
        mixed, soft = mix_batch(images, labels, 4, mixup_alpha=mix, cutmix_alpha=cut, generator=g)
        torch.testing.assert_close(soft.sum(1), torch.ones(4))
        assert mixed.shape == images.shape
    torch.testing.assert_close(images, original)  # inputs untouched
    task = classifier_task(mixup_alpha=0.8, cutmix_alpha=1.0)
    batch = task.augment(_batch(4, 8), g)
    loss, logs = task.loss(torch.randn(4, 4), batch)
    assert "soft_labels" in batch and math.isfinite(float(loss)) and "loss" in logs


def test_topk_known_values_and_small_c() -> None:
    logits = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.1], [0.2, 0.3, 0.5]])
    labels = torch.tensor([1, 1, 0])
    acc = topk_accuracy(logits, labels, ks=(1, 2, 5))
    assert acc["top1"] == pytest.approx(100 / 3)
    assert acc["top2"] == pytest.approx(200 / 3)
    assert acc["top5"] == 100.0  # C = 3 < 5: top-5 is top-3


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 12), c=st.integers(1, 9), seed=st.integers(0, 1000))
def test_topk_monotone_and_matches_sort(n: int, c: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, c, generator=g)
    labels = torch.randint(c, (n,), generator=g)
    counts = topk_correct(logits, labels, ks=(1, 2, 3, 5))
    values = [int(counts[k]) for k in (1, 2, 3, 5)]
    assert values == sorted(values)
    rank = (logits > logits.gather(1, labels[:, None])).sum(1)  # 0 = best
    assert values[0] == int((rank < 1).sum())
    assert values[-1] == int((rank < min(5, c)).sum())


def test_evaluator_skips_padding_entries() -> None:
    ev = classifier_task(3).evaluator()
    logits = torch.tensor([[5.0, 0, 0], [5.0, 0, 0]])
    ev.update(logits, {"labels": torch.tensor([0, 1]), "valid": [True, False]})
    out = ev.compute()
    assert out["top1"] == 100.0 and out["num_samples"] == 1
    acc = TopKAccumulator()
    with pytest.raises(ValueError, match="no samples"):
        acc.compute()


def test_recipe_resolution_flags_win() -> None:
    cfg = resolve_config("imagenet-1k", overrides={"data.train": "d", "runtime.out": "o"})
    assert cfg.schedule.epochs == 300 and cfg.schedule.warmup_epochs == 20
    assert cfg.optim.grad_clip == 5.0 and cfg.optim.lr_base_batch == 1024
    assert cfg.task.name == "classification" and cfg.recipe == "imagenet-1k"
    assert cfg.task.options.mixup_alpha == 0.8 and cfg.task.options.cutmix_alpha == 1.0
    over = resolve_config("imagenet-1k", overrides={"schedule.steps": 10, "optim.lr": 0.01,
                                                    "data.image_size": None})  # fmt: skip
    assert over.schedule.steps == 10 and over.schedule.epochs is None
    # one lr rule (issue 24): a given lr is the rate for the recipe's base batch, as a file's
    assert over.optim.lr == 0.01 and over.optim.lr_base_batch == 1024
    assert over.data.image_size == read_recipe("imagenet-1k")["data"]["image_size"]
    plain = resolve_config(overrides={"task.name": "classification", "schedule.steps": 3})
    assert plain.task.options.label_smoothing == 0.1 and plain.task.options.mixup_alpha == 0.0
    with pytest.raises(ValueError, match="not both"):
        resolve_config(overrides={"task.name": "classification", "schedule.steps": 1,
                                  "schedule.epochs": 1.0})  # fmt: skip
    with pytest.raises(ValueError, match="unknown recipe"):
        resolve_config("cifar")
    with pytest.raises(ValueError, match="amp"):
        resolve_config(overrides={"task.name": "classification", "runtime.amp": "fp8"})
    with pytest.raises(ValueError, match="no task given"):
        resolve_config(overrides={"schedule.steps": 3})


def test_set_merges_into_nested_keys() -> None:
    """--set changes the keys it names; the recipe's other keys of the section stay."""
    cfg = resolve_config("shapes-panoptic", sets=["model.decoder.num_queries=12",
                                                  "model.backbone.head_pool=concat",
                                                  "data.augment.scale_range=[0.5, 1.5]",
                                                  "task.num_points=256"])  # fmt: skip
    assert cfg.model.decoder.num_queries == 12 and cfg.model.decoder.query_init == "free"
    assert cfg.model.backbone.head_pool == "concat"
    assert cfg.data.augment.scale_range == (0.5, 1.5)
    assert cfg.task.options.num_points == 256 and cfg.task.options.class_weight == 5.0
    assert cfg.model_overrides() == {"head_pool": "concat", "num_queries": 12, "query_init": "free"}
    for bad, message in (("model.decoder.num_querys=3", "model.decoder.num_querys: unknown"),
                         ("model.decoder.num_queries=many", "expected int"),
                         ("task.top_k", "KEY=VALUE"),
                         ("task.label_smoothing=0.1", "not an option of the panoptic task")):
        with pytest.raises(ValueError, match=message):
            resolve_config("shapes-panoptic", sets=[bad])


def test_task_errors() -> None:
    with pytest.raises(ValueError, match="unknown task"):
        build_task("depth", 3)


def test_every_task_of_the_paper_is_available() -> None:
    for name in ("classification", "detection", "instance", "semantic", "panoptic"):
        assert build_task(name, 2).name == name
