"""Backbones plug in: one registry of ``--model`` names (presets, the ``timm/`` family, plugins'),
the one place a ``family/variant`` name is resolved, and one weights loader whose rules come
from the backbone module. A test-only backbone (tests/plugins/tiny_conv_backbone.py, loaded as
a plugin) trains a detector through ``cf``."""

from __future__ import annotations

import builtins
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from cli_runner import run_cf

from clusterformer.models import create_model
from clusterformer.models.backbone_weights import (
    align_names,
    backbone_of,
    backbone_tensors,
    load_backbone_weights,
)
from clusterformer.models.backbones import (
    backbone_names,
    is_backbone,
    resolve_backbone,
    timm_model_name,
)

PLUGINS = Path(__file__).parent / "plugins"


def test_model_names_resolve_in_one_place() -> None:
    assert backbone_names()[:4] == ["clusterformer-nano", "clusterformer-tiny",
                                    "clusterformer-small", "timm/<name>"]  # fmt: skip
    entry, variant = resolve_backbone("timm/convnext_tiny")
    assert variant == "convnext_tiny" and entry is resolve_backbone("timm/resnet18")[0]
    assert resolve_backbone("clusterformer-tiny")[0].defaults["depths"] == (2, 2, 6, 2)
    assert timm_model_name("timm/resnet18") == "resnet18" and timm_model_name("resnet18") is None
    assert is_backbone("timm/anything") and is_backbone("clusterformer-nano")
    assert not is_backbone("timm/") and not is_backbone("clusterformer-huge")
    with pytest.raises(ValueError, match=r"unknown model 'huge/x'; expected one of .*timm/<name>"):
        resolve_backbone("huge/x")
    with pytest.raises(ValueError, match="names no timm model"):
        create_model("timm/")


def test_register_backbone_decorates_and_refuses_a_taken_name() -> None:
    from clusterformer.models.backbones import BACKBONES, register_backbone
    from clusterformer.registry import DuplicateNameError

    @register_backbone("decorated-nano", defaults={"depths": (1, 1, 1, 1), "dims": (8, 16, 32, 64),
                                                   "mlp_ratios": (1, 1, 1, 1), "head_dim": 8},
                       options=("window_size",), classifies=True)  # fmt: skip
    def build(**options):  # noqa: ANN003, ANN202 - a ClusterFormer with the options
        from clusterformer.models import ClusterFormer

        return ClusterFormer(**options)

    try:
        model = create_model("decorated-nano", num_classes=3, window_size=4)
        assert model.num_classes == 3 and model.feature_channels == (8, 16, 32, 64)
        with pytest.raises(TypeError, match="unknown model option.*num_iters; accepted:.*window_size"):
            create_model("decorated-nano", num_iters=1)
        with pytest.raises(DuplicateNameError, match="backbone 'decorated-nano'"):
            register_backbone("decorated-nano", build)
    finally:
        BACKBONES.unregister("decorated-nano")
    assert not is_backbone("decorated-nano")


def test_names_align_by_the_prefix_most_names_agree_on() -> None:
    own = {"body.conv1.weight", "body.layer1.0.conv1.weight", "body.fc_norm.weight"}
    tensor = torch.zeros(1)
    # a timm model's own file (added prefix); a run's checkpoint (wrapper taken off); both
    for theirs in ({"conv1.weight", "layer1.0.conv1.weight", "fc_norm.weight", "fc.weight"},
                   {"backbone.body.conv1.weight", "backbone.body.layer1.0.conv1.weight",
                    "backbone.body.fc_norm.weight", "decoder.conv1.weight"},
                   {"module.conv1.weight", "module.layer1.0.conv1.weight",
                    "module.fc_norm.weight"}):  # fmt: skip
        assert set(align_names(own, dict.fromkeys(theirs, tensor))) == own
    assert align_names(own, {"head.weight": tensor}) == {}


def test_a_classifier_keeps_its_head_out_of_the_backbone_weights() -> None:
    """The backbone module names its classifier modules; they are never loaded."""
    model = create_model("clusterformer-nano", num_classes=4)
    names = set(backbone_tensors(backbone_of(model)))
    assert names and not any(n.startswith(("head.", "head_norm.")) for n in names)
    assert names == set(model.state_dict()) - {k for k in model.state_dict() if k.startswith("head")}


def test_published_weights_need_a_backbone_that_has_them() -> None:
    model = create_model("clusterformer-nano", num_classes=4)
    with pytest.raises(ValueError, match="--backbone-weights timm: ClusterFormer has no published"):
        load_backbone_weights(model, "timm")


def test_a_torchvision_that_does_not_match_torch_is_explained_in_one_line(monkeypatch) -> None:
    """Importing timm with a torchvision built for another torch raises "operator
    torchvision::nms does not exist"; the user reads which torchvision to install."""
    real_import = builtins.__import__

    def broken_import(name: str, *args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        if name == "timm":
            raise RuntimeError("operator torchvision::nms does not exist")
        return real_import(name, *args, **kwargs)

    monkeypatch.delitem(__import__("sys").modules, "timm", raising=False)
    monkeypatch.setattr(builtins, "__import__", broken_import)
    with pytest.raises(ValueError) as caught:
        create_model("timm/resnet18", task="detection", num_classes=2)
    message = str(caught.value)
    release = torch.__version__.split("+")[0].split(".")
    assert "torchvision::nms does not exist" in message and "\n" not in message
    assert f"pip install torchvision==0.{int(release[1]) + 15}.*" in message


@pytest.fixture()
def plugin(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """This process finds the backbone as a fresh ``cf`` would: from the environment variable;
    afterwards the name and the module are gone again, so no later test sees them."""
    import sys

    from clusterformer.models.backbones import BACKBONES

    monkeypatch.setenv("CLUSTERFORMER_PLUGINS", "tiny_conv_backbone")
    monkeypatch.syspath_prepend(str(PLUGINS))
    yield
    if "tiny-conv" in BACKBONES.names():  # the module is still imported: nothing loads again
        BACKBONES.unregister("tiny-conv")
    sys.modules.pop("tiny_conv_backbone", None)


def test_a_plugin_backbone_trains_a_detector_through_cf(tmp_path: Path, plugin: None,
                                                        capsys: pytest.CaptureFixture) -> None:  # fmt: skip
    from clusterformer.data import make_shapes, open_source, write_shards
    from clusterformer.engine.checkpoint import resolve_checkpoint

    made = make_shapes(tmp_path / "raw", num_images=4, image_size=64, seed=0, kinds=("scenes",))
    shards = tmp_path / "shards"
    write_shards(open_source("coco", made["images"], made["instances"]), shards)
    run = tmp_path / "run"
    code = run_cf(["train", "--task", "detection", "--model", "tiny-conv", "--data", str(shards),
                   "--out", str(run), "--steps", "2", "--batch-size", "2", "--image-size", "64",
                   "--hidden-dim", "32", "--decoder-layers", "2", "--num-queries", "10"])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    assert json.loads((run / "config.json").read_text())["model"]["name"] == "tiny-conv"
    assert run_cf(["eval", "--ckpt", str(run), "--data", str(shards)]) == 0  # rebuilt by name
    # Its backbone initialises another task's model through the one loader (heads fresh).
    classifier = create_model("tiny-conv", num_classes=3)
    assert load_backbone_weights(classifier, resolve_checkpoint(run)) == 8  # 4 convs x 2
    capsys.readouterr()
    assert run_cf(["models", "--json"]) == 0
    rows = {row["name"]: row for row in json.loads(capsys.readouterr().out)}
    assert rows["tiny-conv"] == {"name": "tiny-conv", "kind": "backbone",
                                 "about": "test-only: four strided convolutions"}  # fmt: skip


def test_cf_train_names_every_model_for_an_unknown_one(tmp_path: Path, capsys) -> None:  # noqa: ANN001
    (tmp_path / "data").mkdir()
    code = run_cf(["train", "--task", "detection", "--model", "resnet", "--data",
                   str(tmp_path / "data"), "--out", str(tmp_path / "run")])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "--model must be one of clusterformer-nano" in err and "timm/<name>" in err
    assert err.endswith("got 'resnet'")
