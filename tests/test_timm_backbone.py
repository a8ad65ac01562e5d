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


def _shards(tmp_path: Path, kind: str) -> Path:
    """Shards of 4 synthetic 48 px images: ``"classes"`` (ImageFolder) or ``"scenes"`` (COCO)."""
    from clusterformer.data import make_shapes, open_source, write_shards

    made = make_shapes(tmp_path / f"raw-{kind}", num_images=4, image_size=48, seed=0, kinds=(kind,))
    source = (open_source("imagefolder", Path(made["classes"])) if kind == "classes"
              else open_source("coco", made["images"], made["instances"]))  # fmt: skip
    write_shards(source, tmp_path / f"shards-{kind}")
    return tmp_path / f"shards-{kind}"


def test_pretrained_from_a_timm_run_loads_its_backbone(tmp_path: Path, capsys) -> None:  # noqa: ANN001
    """A classification run on timm/resnet18 initialises a detector's backbone (--pretrained):
    the backbone tensors are the timm model's, under ``backbone.body.``, whatever the task."""
    from safetensors.torch import load_file

    from clusterformer.engine.checkpoint import resolve_checkpoint
    from clusterformer.models.backbone_weights import load_backbone_weights

    common = ["--model", f"timm/{NAME}", "--steps", "1", "--batch-size", "2", "--image-size", "48"]
    cls_run = tmp_path / "cls"
    assert run_cf(["train", "--task", "classification", "--data", str(_shards(tmp_path, "classes")),
                   "--out", str(cls_run), *common]) == 0  # fmt: skip
    capsys.readouterr()
    det = ["train", "--task", "detection", "--data", str(_shards(tmp_path, "scenes")), *common,
           "--hidden-dim", "32", "--decoder-layers", "2", "--pretrained", str(cls_run)]  # fmt: skip
    assert run_cf([*det, "--out", str(tmp_path / "det")]) == 0
    body = timm.create_model(NAME, features_only=True).state_dict()
    captured = capsys.readouterr()
    assert f"backbone initialised from {cls_run} ({len(body)} tensors)" in captured.out + captured.err
    model = create_model(f"timm/{NAME}", task="detection", num_classes=2, **SMALL)
    assert load_backbone_weights(model, resolve_checkpoint(cls_run)) == len(body)
    saved = load_file(str(resolve_checkpoint(cls_run)))
    for name, tensor in model.backbone.body.state_dict().items():
        assert torch.equal(tensor, saved[f"backbone.body.{name}"]), name


def _hf_cache(root: Path) -> dict[str, torch.Tensor]:
    """A Hugging Face cache under ``root`` holding timm's published weights of NAME (random
    ones here), laid out as ``huggingface_hub`` writes it: ``models--ORG--NAME/refs/main`` names
    the snapshot, ``snapshots/<commit>/model.safetensors`` holds the weights."""
    from safetensors.torch import save_file

    classifier = timm.create_model(NAME, pretrained=False)
    repo = root / "hub" / ("models--" + classifier.pretrained_cfg["hf_hub_id"].replace("/", "--"))
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit).mkdir(parents=True)
    weights = {k: torch.randn(v.shape) if v.is_floating_point() else v
               for k, v in classifier.state_dict().items()}  # fmt: skip
    save_file(weights, str(repo / "snapshots" / commit / "model.safetensors"))
    return weights


CHECK_PUBLISHED = """
import sys, torch
from safetensors.torch import load_file
from clusterformer.models import create_model, load_backbone_weights
model = create_model("timm/{name}", task="detection", num_classes=2, hidden_dim=32)
count = load_backbone_weights(model, "timm")
published = load_file(sys.argv[1])
body = model.backbone.body.state_dict()
assert count == len(body), count
assert all(torch.equal(v, published[k]) for k, v in body.items())
print("loaded", count)
"""


def test_backbone_weights_timm_reads_timms_weights_from_the_hugging_face_cache(tmp_path: Path) -> None:
    """--backbone-weights timm: timm's own weights, here read offline from a local cache the
    test made (HF_HUB_OFFLINE=1: nothing is fetched); without them, one line says what to do."""
    import os
    import subprocess
    import sys

    from cli_runner import run_cf_child

    _hf_cache(tmp_path / "hf")
    offline = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"),
               "HF_HUB_CACHE": str(tmp_path / "hf" / "hub")}  # fmt: skip
    weights = next((tmp_path / "hf" / "hub").glob("models--*/snapshots/*/model.safetensors"))
    done = subprocess.run([sys.executable, "-c", CHECK_PUBLISHED.format(name=NAME), str(weights)],
                          env={**os.environ, "OMP_NUM_THREADS": "1", **offline},
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0 and "loaded" in done.stdout, done.stderr
    shards = _shards(tmp_path, "scenes")

    def train(out: str, env: dict[str, str]):  # noqa: ANN202 - a CompletedProcess
        return run_cf_child(["train", "--task", "detection", "--model", f"timm/{NAME}",
                             "--backbone-weights", "timm", "--data", shards, "--out",
                             tmp_path / out, "--steps", "1", "--batch-size", "2", "--image-size",
                             "48", "--hidden-dim", "32"], env=env)  # fmt: skip

    trained = train("run", offline)
    assert trained.returncode == 0, trained.stderr
    assert "backbone weights from timm" in trained.stdout + trained.stderr
    refused = train("run2", {**offline, "HF_HOME": str(tmp_path / "none"),
                             "HF_HUB_CACHE": str(tmp_path / "none")})  # fmt: skip
    lines = refused.stderr.strip().splitlines()
    assert refused.returncode == 1 and len(lines) == 1, refused.stderr
    assert "pretrained weights could not be loaded" in lines[0]
    assert "--backbone-weights FILE" in lines[0]
