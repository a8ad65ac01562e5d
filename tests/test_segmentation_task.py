"""Segmentation tasks: targets, criterion (loss falls, gradients), post-processing independent
of batch size and padding, on synthetic shapes made in tmp_path."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from model_kit import fit_fixed_batch
from PIL import Image

from clusterformer.data import LoaderSpec, build_loader, make_shapes, open_source, write_shards
from clusterformer.models import create_model
from clusterformer.tasks import build_task
from clusterformer.tasks.criterion import MaskCriterion, pairwise_dice, pairwise_sigmoid_ce
from clusterformer.tasks.masks import MaskTask, point_scales

SMALL = {"hidden_dim": 32, "decoder_heads": 2, "decoder_ffn_dim": 64, "num_queries": 10,
         "decoder_layers": 3}
TASKS = ("instance", "semantic", "panoptic")


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Shards of each format from 64x64 images and 64x90 widened ones (batches get padded)."""
    root = tmp_path_factory.mktemp("seg")
    made = make_shapes(root / "shapes", num_images=5, image_size=64, seed=0)
    for path in sorted(Path(made["images"]).glob("*.jpg"))[3:]:  # widen two images and labels
        for folder, suffix in ((made["images"], ".jpg"), (made["panoptic_masks"], ".png"),
                               (made["semantic_masks"], ".png")):
            src = Path(folder) / f"{path.stem}{suffix}"
            im = Image.open(src)
            wide = Image.new(im.mode, (90, 64))
            wide.paste(im, (0, 0))
            wide.save(src, quality=95) if suffix == ".jpg" else wide.save(src)
    for name in ("instances", "panoptic_json"):
        data = json.loads(Path(made[name]).read_text())
        for im in data["images"][3:]:
            im["width"] = 90
        data["annotations"] = [a for a in data["annotations"] if not a.get("iscrowd")
                               or a["image_id"] <= 3]
        Path(made[name]).write_text(json.dumps(data))
    sources = {
        "instance": open_source("coco", made["images"], made["instances"]),
        "panoptic": open_source("coco-panoptic", made["images"], made["panoptic_json"], made["panoptic_masks"]),
        "semantic": open_source("ade20k", made["images"], made["classes_json"], made["semantic_masks"]),
    }
    out = {}
    for name, source in sources.items():
        write_shards(source, root / name, samples_per_shard=5, shuffle=False)
        out[name] = root / name
    shutil.rmtree(root / "shapes")
    return out


def _model(task: str, num_classes: int, **extra: object) -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model("clusterformer-nano", task=task, num_classes=num_classes, **SMALL, **extra)


def _batch(path: Path, task: str, batch_size: int, image_size: int = 64) -> dict:
    spec = LoaderSpec(batch_size=batch_size, image_size=image_size, train=False)
    return next(iter(build_loader(str(path), task, spec)))


def test_task_names_metrics_and_config_roundtrip() -> None:
    for name, metric in (("instance", "segm_AP"), ("semantic", "mIoU"), ("panoptic", "PQ")):
        task = build_task(name, 3, num_points=64)
        assert isinstance(task, MaskTask) and task.name == name and task.primary_metric == metric
        assert build_task(name, 3, **task.config()).config() == task.config()
        with pytest.raises(ValueError, match=f"label_smoothing: not an option of the {name} task"):
            build_task(name, 3, label_smoothing=0.1)


def test_mask_targets_per_task(shards: dict[str, Path]) -> None:
    sem = _batch(shards["semantic"], "semantic", 2)
    targets = build_task("semantic", 7).targets(sem, torch.device("cpu"))
    for t, raw in zip(targets, sem["targets"], strict=True):
        assert 255 not in t["labels"].tolist()
        assert t["masks"].shape[1:] == raw["semantic"].shape
        assert t["masks"].sum(0).max() <= 1  # one mask per class, disjoint
    inst = _batch(shards["instance"], "instance", 5)
    inst_targets = build_task("instance", 4).targets(inst, torch.device("cpu"))
    for t, raw in zip(inst_targets, inst["targets"], strict=True):
        assert len(t["labels"]) == int((~raw["iscrowd"]).sum())


def test_point_scales_cover_the_real_extent() -> None:
    batch = {"targets": [{"size": (64, 90)}, {"size": (61, 30)}]}
    scales = point_scales(batch, (16, 23), torch.device("cpu"))
    assert torch.allclose(scales, torch.tensor([[90 / 92, 64 / 64], [30 / 92, 61 / 64]]))


def test_pairwise_costs_match_elementwise_losses() -> None:
    from clusterformer.ops.losses import dice_loss, sigmoid_bce_loss

    logits, targets = torch.randn(4, 30), (torch.rand(3, 30) > 0.5).float()
    ce, dice = pairwise_sigmoid_ce(logits, targets), pairwise_dice(logits, targets)
    for q in range(4):
        for t in range(3):
            assert torch.allclose(ce[q, t], sigmoid_bce_loss(logits[q], targets[t]), atol=1e-5)
            assert torch.allclose(dice[q, t], dice_loss(logits[q], targets[t]), atol=1e-5)


def test_criterion_perfect_prediction_and_empty_targets() -> None:
    crit = MaskCriterion(2, num_points=2000, importance_sample_ratio=0.0)  # uniform points
    masks = torch.zeros(1, 3, 8, 8)
    masks[0, 0, :4] = 1
    logits = torch.full((1, 3, 3), -30.0)
    logits[0, :, 2] = 30.0
    logits[0, 0] = torch.tensor([30.0, -30.0, -30.0])
    pred = {"pred_logits": logits, "pred_masks": (masks * 2 - 1) * 30}
    targets = [{"labels": torch.tensor([0]), "masks": torch.zeros(32, 32, dtype=torch.bool)}]
    targets[0]["masks"][:16] = True
    total, scalars = crit(pred, [{**targets[0], "masks": targets[0]["masks"][None]}], torch.ones(1, 2))
    # only the bilinear band around the mask border (1/8 of the image) is uncertain
    assert scalars["loss_class"] < 1e-6 and scalars["loss_mask"] < 0.05 and scalars["loss_dice"] < 0.02
    empty = [{"labels": torch.zeros(0, dtype=torch.int64), "masks": torch.zeros(0, 32, 32, dtype=torch.bool)}]
    total, scalars = crit(pred, empty, torch.ones(1, 2))
    assert torch.isfinite(total) and scalars["loss_mask"] == 0.0


@pytest.mark.parametrize("task_name", TASKS)
def test_loss_falls_on_a_fixed_batch(shards: dict[str, Path], task_name: str) -> None:
    num_classes = 4 if task_name == "instance" else 7
    task = build_task(task_name, num_classes, num_points=256)
    model = _model(task_name, num_classes)
    batch = _batch(shards[task_name], task_name, 2)
    torch.manual_seed(1)
    losses, scalars = fit_fixed_batch(task, model, batch, 12)
    assert {"loss_class", "loss_mask", "loss_dice", "loss_class_enc"} <= set(scalars)
    assert losses[-1] < 0.85 * losses[0]


@pytest.mark.parametrize("masked_attention", [False, True])
def test_every_parameter_gets_a_finite_gradient(shards: dict[str, Path], masked_attention: bool) -> None:
    task = build_task("panoptic", 7, num_points=128)
    model = _model("panoptic", 7, masked_attention=masked_attention)
    batch = _batch(shards["panoptic"], "panoptic", 5)
    outputs = task.forward(model, batch)
    assert outputs["pred_logits"].shape == (5, 10, 8)
    assert outputs["pred_masks"].shape[-2:] == (16, 16) and len(outputs["aux_outputs"]) == 2
    loss, _ = task.loss(outputs, batch)
    loss.backward()
    for name, param in model.named_parameters():
        assert param.grad is not None, name
        assert torch.isfinite(param.grad).all(), name


@pytest.mark.parametrize("task_name", TASKS)
def test_predictions_identical_at_batch_size_1_and_4(shards: dict[str, Path], task_name: str) -> None:
    num_classes = 4 if task_name == "instance" else 7
    model = _model(task_name, num_classes).eval()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # random, non-degenerate heads so masks and scores vary
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    categories = [{"id": i, "name": str(i), "isthing": i < 4} for i in range(num_classes)]
    task = build_task(task_name, categories, object_threshold=0.0)
    preds = {}
    for bsz in (1, 4):
        loader = build_loader(str(shards[task_name]), task_name,
                              LoaderSpec(batch_size=bsz, image_size=72, train=False))
        preds[bsz] = {}
        with torch.no_grad():
            for batch in loader:
                for key, pred in zip(batch["keys"], task.postprocess(task.forward(model, batch), batch), strict=True):
                    preds[bsz][key] = pred
    assert len(preds[1]) == len(preds[4]) == 5
    for key, one in preds[1].items():
        four = preds[4][key]
        if task_name == "semantic":
            assert one.shape == four.shape and (one != four).float().mean() < 1e-3
        elif task_name == "instance":
            assert torch.allclose(one["scores"], four["scores"], atol=1e-4)
            assert torch.equal(one["labels"], four["labels"])
            assert (one["masks"] != four["masks"]).float().mean() < 1e-3
        else:
            assert [s["category_id"] for s in one["segments"]] == [s["category_id"] for s in four["segments"]]
            assert (one["panoptic"] != four["panoptic"]).float().mean() < 1e-3
    widened = [p for p in preds[1].values()]
    shapes = {tuple((p if task_name == "semantic" else p.get("panoptic", p.get("masks"))).shape[-2:]) for p in widened}
    assert shapes == {(64, 64), (64, 90)}  # mapped back to the original sizes
