"""timm backbones behind the backbone contract (``--model timm/<name>``) with local weights
(``--backbone-weights``). Needs the optional timm (and a torchvision matching torch): skipped
without it. Nothing downloads: weights are random ones saved to a file and loaded back."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from cli_runner import run_cf

timm = pytest.importorskip("timm")

from clusterformer.models import create_model, feature_channels, load_backbone_weights  # noqa: E402

NAME = "resnet18"  # features at strides 2, 4, 8, 16, 32; the heads take the last four
SMALL = {"hidden_dim": 32, "num_queries": 6, "decoder_layers": 2, "decoder_heads": 2,
         "decoder_ffn_dim": 32}  # fmt: skip


@pytest.mark.parametrize("task", ["detection", "panoptic", "classification"])
def test_any_task_runs_on_a_timm_backbone(task: str) -> None:
    torch.manual_seed(0)
    model = create_model(f"timm/{NAME}", task=task, num_classes=3,
                         **({} if task == "classification" else SMALL))  # fmt: skip
    assert feature_channels(model.backbone) == (64, 128, 256, 512)
    images, mask = torch.randn(2, 3, 64, 80), torch.ones(2, 64, 80, dtype=torch.bool)
    mask[1, 40:] = False
    out = model(images, mask)
    logits = out if task == "classification" else out["pred_logits"]
    assert logits.shape[0] == 2 and torch.isfinite(logits).all()
    logits.float().sum().backward()
    pretrained = timm.create_model(NAME, pretrained=False).default_cfg
    assert model.default_cfg["mean"] == tuple(pretrained["mean"])


def test_local_weights_load_from_safetensors_and_state_dicts(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    source = timm.create_model(NAME, pretrained=False, num_classes=10)  # a classifier's file
    state = {k: v.contiguous() for k, v in source.state_dict().items()}
    save_file(state, str(tmp_path / "w.safetensors"))
    torch.save({"state_dict": state}, tmp_path / "w.pth")
    for path in (tmp_path / "w.safetensors", tmp_path / "w.pth"):
        model = create_model(f"timm/{NAME}", task="detection", num_classes=2, **SMALL)
        loaded = load_backbone_weights(model, path)
        body = model.backbone.body.state_dict()
        assert loaded == len(body)  # every backbone tensor; the classifier's fc is ignored
        for name, tensor in body.items():
            assert torch.equal(tensor, state[name]), name
    other = {k: v for k, v in state.items() if not k.startswith("layer4.")}
    save_file(other, str(tmp_path / "short.safetensors"))
    with pytest.raises(ValueError, match="layer4.*missing"):
        load_backbone_weights(model, tmp_path / "short.safetensors")


def test_cf_train_with_a_timm_backbone_and_its_weights(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    from clusterformer.data import make_shapes, open_source, write_shards

    made = make_shapes(tmp_path / "raw", num_images=4, image_size=64, seed=0, kinds=("scenes",))
    shards = tmp_path / "shards"
    write_shards(open_source("coco", made["images"], made["instances"]), shards)
    weights = tmp_path / "resnet18.safetensors"
    save_file({k: v.contiguous() for k, v in timm.create_model(NAME).state_dict().items()},
              str(weights))
    run = tmp_path / "run"
    code = run_cf(["train", "--task", "detection", "--model", f"timm/{NAME}", "--backbone-weights",
                   str(weights), "--data", str(shards), "--out", str(run), "--steps", "1",
                   "--batch-size", "2", "--image-size", "64", "--hidden-dim", "32",
                   "--decoder-layers", "2"])  # fmt: skip
    assert code == 0
    config = json.loads((run / "config.json").read_text())
    assert config["model"]["backbone"]["weights"] == str(weights)
    assert run_cf(["eval", "--ckpt", str(run), "--data", str(shards)]) == 0  # rebuilt, no file
