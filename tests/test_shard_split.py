"""cf shard-dataset --val-fraction F --seed S: train and val folders from one source, every
sample in exactly one, byte for byte; deterministic by seed; recorded in dataset.json."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_shard import cf, read_tars

from clusterformer.data.shapes import make_shapes


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return Path(make_shapes(tmp_path_factory.mktemp("split") / "s", num_images=20, image_size=32)["root"])


def _split(root: Path, out: Path, capsys, *extra: str) -> dict:
    code, err = cf(["shard-dataset", "--format", "coco", "--images", root / "images",
                    "--annotations", root / "instances.json", "--out", out,
                    "--samples-per-shard", "3", *extra], capsys)  # fmt: skip
    assert code == 0, err
    return {name: json.loads((out / name / "dataset.json").read_text()) for name in ("train", "val")}


def test_split_keeps_every_byte_once_and_records_itself(root, tmp_path, capsys) -> None:
    whole_out = tmp_path / "whole"
    code, err = cf(["shard-dataset", "--format", "coco", "--images", root / "images",
                    "--annotations", root / "instances.json", "--out", whole_out], capsys)  # fmt: skip
    assert code == 0, err
    whole = dict(read_tars(whole_out))
    infos = _split(root, tmp_path / "split", capsys, "--val-fraction", "0.25", "--seed", "7")
    parts = {name: dict(read_tars(tmp_path / "split" / name)) for name in infos}
    assert not set(parts["train"]) & set(parts["val"])
    assert {**parts["train"], **parts["val"]} == whole  # same keys, same bytes
    assert len(parts["val"]) == 5 and len(parts["train"]) == 15
    for name, info in infos.items():
        assert info["num_samples"] == len(parts[name])
        assert info["split"] == {"name": name, "val_fraction": 0.25, "seed": 7,
                                 "counts": {"train": 15, "val": 5},
                                 "source": str(root / "images")}  # fmt: skip
        assert info["categories"] and info["format"] == "coco"
    assert not list((tmp_path / "split").rglob(".*.tmp*"))  # nothing half-written left


def test_split_is_deterministic_by_seed(root, tmp_path, capsys) -> None:
    keys = {}
    for label, seed in (("a", "1"), ("b", "1"), ("c", "2")):
        _split(root, tmp_path / label, capsys, "--val-fraction", "0.3", "--seed", seed)
        keys[label] = sorted(k for k, _ in read_tars(tmp_path / label / "val"))
    assert keys["a"] == keys["b"] and keys["a"] != keys["c"]


@pytest.mark.parametrize("fraction", ["0", "1", "-0.5", "1.5"])
def test_bad_fraction_is_one_line(root, tmp_path, capsys, fraction) -> None:
    code, err = cf(["shard-dataset", "--format", "coco", "--images", root / "images",
                    "--annotations", root / "instances.json", "--out", tmp_path / "x",
                    "--val-fraction", fraction], capsys)  # fmt: skip
    assert code != 0 and "--val-fraction must be between 0 and 1" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "x").exists()
