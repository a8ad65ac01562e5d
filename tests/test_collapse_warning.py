"""A model whose predictions collapse to one class is flagged (issue 24, point 7): ``cf predict``
and ``cf eval`` give one warning line for a semantic model that puts (nearly) every pixel in one
class, and for a classifier that gives (nearly) every image one class.

The command-line tests fail on the code before the issue, which printed no such line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_runner import run_cf
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

from clusterformer.inference.collapse import (
    COLLAPSE_MIN_IMAGES,
    COLLAPSE_SHARE,
    collapse_warning,
)

LEGACY_CKPT = Path(__file__).parent / "fixtures" / "legacy" / "classification.safetensors"


def _cf(args: list[object], capsys: pytest.CaptureFixture) -> tuple[int, str]:
    code = run_cf([str(a) for a in args])
    return code, capsys.readouterr().err


def _warnings(err: str) -> list[str]:
    return [line for line in err.splitlines() if "collapsed to one class" in line]


# ----------------------------------------------------------------------------- the rule
def test_the_share_and_the_image_count_both_decide() -> None:
    names = ["wall", "sky", "floor"]
    at = [COLLAPSE_SHARE * 1000, 1000 * (1 - COLLAPSE_SHARE), 0]
    below = [COLLAPSE_SHARE * 1000 - 10, 1000 * (1 - COLLAPSE_SHARE) + 10, 0]
    enough = COLLAPSE_MIN_IMAGES["pixels"]
    warning = collapse_warning(at, names, enough, "pixels")
    assert warning is not None and "'wall'" in warning and "95.0%" in warning
    assert collapse_warning(below, names, enough, "pixels") is None
    assert collapse_warning(at, names, enough - 1, "pixels") is None  # one photo may be all wall
    assert collapse_warning([0, 0, 0], names, enough, "pixels") is None
    ten = COLLAPSE_MIN_IMAGES["images"]
    assert collapse_warning([ten, 0, 0], names, ten, "images") is not None
    assert collapse_warning([ten - 1, 0, 0], names, ten - 1, "images") is None


def test_with_the_truth_a_one_sided_dataset_is_no_collapse() -> None:
    names = ["wall", "sky"]
    predicted = [990, 10]
    assert collapse_warning(predicted, names, 4, "pixels", truth=[970, 30]) is None
    warning = collapse_warning(predicted, names, 4, "pixels", truth=[400, 600])
    assert warning is not None and "ground truth 40.0%" in warning


# ----------------------------------------------------------------------------- semantic
def test_cf_predict_warns_once_about_a_collapsed_segmenter(
    collapsed_semantic: dict, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    images = collapsed_semantic["images"][:2]
    code, err = _cf(["predict", "--ckpt", collapsed_semantic["collapsed"], *images, "--out",
                     tmp_path / "out"], capsys)  # fmt: skip
    assert code == 0, err
    lines = _warnings(err)
    assert len(lines) == 1 and "'sky'" in lines[0] and "pixels" in lines[0], err
    assert "2 images" in lines[0]
    # and one image alone is not enough to call it (a photo can be all sky)
    code, err = _cf(["predict", "--ckpt", collapsed_semantic["collapsed"], images[0], "--out",
                     tmp_path / "one"], capsys)  # fmt: skip
    assert code == 0 and not _warnings(err), err


def test_cf_eval_warns_once_with_the_ground_truth_share(
    collapsed_semantic: dict, capsys: pytest.CaptureFixture
) -> None:
    code, err = _cf(["eval", "--ckpt", collapsed_semantic["collapsed"], "--data",
                     collapsed_semantic["shards"]], capsys)  # fmt: skip
    assert code == 0, err
    lines = _warnings(err)
    assert len(lines) == 1 and "'sky'" in lines[0] and "ground truth" in lines[0], err


# ----------------------------------------------------------------------------- classification
def _classifier_predicting(klass: int, target: Path) -> Path:
    with safe_open(str(LEGACY_CKPT), "pt") as f:
        metadata = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - no iteration on f
    tensors["head.weight"] = torch.zeros_like(tensors["head.weight"])
    tensors["head.bias"] = torch.zeros_like(tensors["head.bias"])
    tensors["head.bias"][klass] = 10.0
    save_file(tensors, str(target), metadata=metadata)
    return target


def test_cf_predict_warns_when_every_image_gets_one_class(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    ckpt = _classifier_predicting(3, tmp_path / "one-class.safetensors")
    folder = tmp_path / "in"
    folder.mkdir()
    rng = np.random.default_rng(0)
    count = COLLAPSE_MIN_IMAGES["images"]
    for i in range(count):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    code, err = _cf(["predict", "--ckpt", ckpt, folder, "--out", tmp_path / "out"], capsys)
    assert code == 0, err
    records = json.loads((tmp_path / "out" / "predictions.json").read_text())
    assert {r["classes"][0]["train_id"] for r in records} == {3}
    lines = _warnings(err)
    assert len(lines) == 1 and "'3'" in lines[0] and f"{count} images" in lines[0], err
