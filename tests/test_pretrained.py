"""``--pretrained``: a checkpoint's backbone initialises another task's model (heads fresh),
through the one backbone-weights loader (:mod:`clusterformer.models.backbone_weights`)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from clusterformer.engine.checkpoint import save_checkpoint
from clusterformer.engine.evaluate import checkpoint_metadata
from clusterformer.models import create_model
from clusterformer.models.backbone_weights import (
    backbone_of,
    backbone_tensors,
    load_backbone_weights,
)
from clusterformer.tasks import build_task
from tests.cli_runner import run_cf

SMALL_DECODER = {"hidden_dim": 32, "num_queries": 6, "decoder_layers": 2, "decoder_heads": 2,
                 "decoder_ffn_dim": 32}  # fmt: skip


def _save(model: torch.nn.Module, task: str, folder: Path) -> Path:
    meta = checkpoint_metadata(model, build_task(task, model.num_classes), image_size=32)
    return save_checkpoint(folder, weights=model, metadata=meta, state={}, step=1)


def _backbone_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return backbone_tensors(backbone_of(model))


@pytest.mark.parametrize("task", ["panoptic", "detection", "classification"])
def test_classifier_backbone_initialises_any_task(tmp_path, task):
    torch.manual_seed(0)
    source = create_model("clusterformer-nano", num_classes=4)
    path = _save(source, "classification", tmp_path / "cls")
    torch.manual_seed(1)
    options = {} if task == "classification" else SMALL_DECODER
    target = create_model("clusterformer-nano", task=task, num_classes=7, **options)
    head_before = {k: v.clone() for k, v in target.state_dict().items() if "head" in k}
    loaded = load_backbone_weights(target, path)
    assert loaded == len(_backbone_tensors(source))
    theirs, ours = _backbone_tensors(source), _backbone_tensors(target)
    assert theirs.keys() == ours.keys() and all(torch.equal(theirs[k], ours[k]) for k in theirs)
    assert all(torch.equal(v, target.state_dict()[k]) for k, v in head_before.items())


def test_dense_checkpoint_backbone_goes_back_to_a_classifier(tmp_path):
    source = create_model("clusterformer-nano", task="semantic", num_classes=3, **SMALL_DECODER)
    path = _save(source, "semantic", tmp_path / "seg")
    target = create_model("clusterformer-nano", num_classes=10)
    load_backbone_weights(target, path)
    assert all(torch.equal(v, _backbone_tensors(target)[k]) for k, v in _backbone_tensors(source).items())


def test_another_preset_is_refused_by_name(tmp_path):
    path = _save(create_model("clusterformer-nano", num_classes=4), "classification", tmp_path / "n")
    target = create_model("clusterformer-nano", num_classes=4, dims=(32, 64, 128, 192))
    with pytest.raises(ValueError, match="does not fit this model"):
        load_backbone_weights(target, path)


def test_cli_train_with_pretrained(tmp_path, capsys):
    from clusterformer.data.formats import open_source
    from clusterformer.data.shapes import make_shapes
    from clusterformer.data.shards import write_shards

    made = make_shapes(tmp_path / "raw", num_images=8, image_size=32, kinds=("classes",))
    write_shards(open_source("imagefolder", Path(made["classes"])), tmp_path / "shards")
    source = create_model("clusterformer-nano", num_classes=4)
    path = _save(source, "classification", tmp_path / "cls")
    common = ["train", "--task", "classification", "--data", str(tmp_path / "shards"), "--steps",
              "1", "--batch-size", "4", "--image-size", "32", "--log-every", "1"]  # fmt: skip
    assert run_cf([*common, "--out", str(tmp_path / "run"), "--pretrained", str(path)]) == 0
    captured = capsys.readouterr()
    assert "backbone initialised from" in captured.out + captured.err
    code = run_cf([*common, "--out", str(tmp_path / "run2"), "--pretrained", str(tmp_path / "nope")])
    assert code != 0 and "--pretrained checkpoint not found" in capsys.readouterr().err
