"""The evaluation preprocessing record: its rules, its round trip through checkpoints, old
checkpoints without one, and the loader / cf eval / cf predict reading it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from clusterformer.data.loader_spec import LoaderSpec
from clusterformer.data.preprocess import (
    EvalPreprocess,
    apply_preprocess,
    default_eval_preprocess,
    eval_transform,
    resized_shape,
)
from clusterformer.data.sample_spec import sample_spec
from clusterformer.engine.checkpoint import CheckpointError, encode_metadata, read_metadata
from clusterformer.engine.evaluate import eval_preprocess, load_model_from_checkpoint

LEGACY = Path(__file__).parent / "fixtures" / "legacy"
MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


def _image(h: int, w: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def test_default_records_are_imagenet_and_long_side() -> None:
    image = default_eval_preprocess("image", 224)
    assert (image.resize, image.resize_to, image.crop) == ("short_side", 256, 224)
    assert default_eval_preprocess("image", 32, native=True).describe() == "32x32, no crop"
    dense = default_eval_preprocess("dense", 96)
    assert (dense.resize, dense.resize_to, dense.crop) == ("long_side", 96, None)
    with pytest.raises(ValueError, match="unknown transform kind"):
        default_eval_preprocess("video", 32)


@pytest.mark.parametrize("shape", [(70, 93), (93, 70), (48, 48), (500, 31)])
def test_rules_give_the_promised_shapes(shape: tuple[int, int]) -> None:
    h, w = shape
    short = default_eval_preprocess("image", 48, mean=MEAN, std=STD)
    nh, nw = resized_shape(short, h, w)
    assert min(nh, nw) == 55 and abs(nh / nw - h / w) < 0.05
    out = apply_preprocess(short, {"image": _image(h, w)})
    assert tuple(out["image"].shape) == (3, 48, 48) and out["size"] == (48, 48)
    # the record path is the eval transform an evaluation loader gives (one builder)
    spec = LoaderSpec(batch_size=1, image_size=48, train=False,
                      normalisation={"mean": MEAN, "std": STD})  # fmt: skip
    same = spec.transform(sample_spec("classification"))
    assert torch.equal(same({"image": _image(h, w)})["image"], out["image"])
    long = default_eval_preprocess("dense", 64)
    assert max(apply_preprocess(long, {"image": _image(h, w)})["image"].shape[1:]) == 64


def test_record_round_trip_size_change_and_bad_values() -> None:
    pre = default_eval_preprocess("image", 224, mean=MEAN, std=STD)
    assert EvalPreprocess.from_dict(json.loads(json.dumps(pre.to_dict()))) == pre
    bigger = pre.at_size(288)
    assert (bigger.resize_to, bigger.crop, bigger.size) == (329, 288, 288)
    assert pre.at_size(224) is pre
    with pytest.raises(ValueError, match="lacks crop"):
        EvalPreprocess.from_dict({k: v for k, v in pre.to_dict().items() if k != "crop"})
    with pytest.raises(ValueError, match="resize must be one of"):
        EvalPreprocess("fit", 10, None, MEAN, STD, 10)
    with pytest.raises(ValueError, match="std"):
        EvalPreprocess("square", 10, None, MEAN, (1.0, 0.0, 1.0), 10)


def test_normalisation_and_targets_follow_the_record() -> None:
    pre = default_eval_preprocess("dense", 32, mean=MEAN, std=STD)
    sample = {"image": torch.full((3, 16, 64), 255, dtype=torch.uint8),
              "boxes": torch.tensor([[0.0, 0.0, 64.0, 16.0]])}
    out = eval_transform(pre.to_dict())(sample)
    assert out["image"].shape == (3, 8, 32)
    assert torch.allclose(out["image"][:, 0, 0], (1 - torch.tensor(MEAN)) / torch.tensor(STD))
    assert torch.allclose(out["boxes"], torch.tensor([[0.0, 0.0, 32.0, 8.0]]))


def _legacy() -> Path:
    return sorted(p for p in LEGACY.glob("*.safetensors") if not p.name.endswith(".outputs.safetensors")
                  and p.name != "inputs.safetensors")[0]


def test_legacy_checkpoint_gets_todays_default_record() -> None:
    path = _legacy()
    assert "preprocess" not in read_metadata(path)
    _, task, meta = load_model_from_checkpoint(path)
    record = eval_preprocess(meta)
    expected = default_eval_preprocess(task.spec.data.transform, int(meta.get("image_size") or 224),
                                       **meta["normalisation"])  # fmt: skip
    assert record == expected
    assert eval_preprocess(meta, 64).size == 64


def test_damaged_record_is_one_clear_error(tmp_path: Path) -> None:
    source = _legacy()
    meta = {k: v for k, v in read_metadata(source).items() if k != "format"}
    meta["preprocess"] = {"resize": "short_side"}
    bad = tmp_path / "bad.safetensors"
    save_file(load_file(str(source)), str(bad), metadata=encode_metadata(meta))
    with pytest.raises(CheckpointError, match=r"bad\.safetensors: unusable preprocess record"):
        load_model_from_checkpoint(bad)
