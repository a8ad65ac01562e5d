"""Classification augmentation chosen by the data (image size, dataset size), --no-flip, and
the start line that says what was chosen."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from clusterformer.data.augment_policy import choose_image_augment, peek_image_sizes
from clusterformer.data.transforms import make_transform


def test_choice_by_image_and_dataset_size() -> None:
    low = choose_image_augment([(32, 32)] * 5, 1400, 32)
    assert low.scale == (0.35, 1.0) and low.native and "32 px" in low.why
    small = choose_image_augment([(240, 320)] * 5, 40, 224)
    assert small.scale == (0.25, 1.0) and not small.native
    large = choose_image_augment([(375, 500)] * 5, 1_281_167, 224)
    assert large.scale == (0.08, 1.0) and not large.native
    # 64 px images at 64: already the training size, so no centre crop
    assert choose_image_augment([(64, 64)], 20000, 64).native
    # 32 px images trained at 16: a margin to crop, ImageNet's rule
    assert not choose_image_augment([(32, 32)], 100, 16).native
    with pytest.raises(ValueError):
        choose_image_augment([], 10, 32)


def test_no_flip_never_mirrors() -> None:
    image = torch.arange(3 * 8 * 8, dtype=torch.int64).view(3, 8, 8).to(torch.uint8)
    flip = make_transform("classification", 8, train=True, scale=(1.0, 1.0), ratio=(1.0, 1.0),
                          mean=(0, 0, 0), std=(1, 1, 1))  # fmt: skip
    keep = make_transform("classification", 8, train=True, scale=(1.0, 1.0), ratio=(1.0, 1.0),
                          flip=False, mean=(0, 0, 0), std=(1, 1, 1))  # fmt: skip
    flipped = kept = 0
    for seed in range(20):
        a = flip({"image": image}, torch.Generator().manual_seed(seed))["image"]
        b = keep({"image": image}, torch.Generator().manual_seed(seed))["image"]
        flipped += bool(torch.allclose(a, image.float().flip(-1) / 255))
        kept += bool(torch.allclose(b, image.float() / 255))
    assert flipped > 0 and kept == 20


@pytest.fixture(scope="module")
def low_res(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from clusterformer.data import make_shapes, open_source, write_shards

    root = tmp_path_factory.mktemp("lowres")
    made = make_shapes(root / "raw", num_images=16, image_size=32, seed=0)
    write_shards(open_source("imagefolder", Path(made["classes"])), root / "shards",
                 samples_per_shard=8)  # fmt: skip
    return root / "shards"


def test_peek_reads_shards_and_raw_folders(low_res: Path) -> None:
    assert peek_image_sizes(low_res, "classification", limit=5) == [(32, 32)] * 5


def test_train_start_line_and_checkpoint_record(low_res: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    done = subprocess.run(
        [sys.executable, "-m", "clusterformer.cli", "train", "--task", "classification",
         "--data", str(low_res), "--out", str(run), "--steps", "1", "--batch-size", "4",
         "--image-size", "32", "--no-flip", "--device", "cpu"],
        env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    start = "\n".join(line for line in done.stdout.splitlines() if line.startswith("cf: "))
    assert "augment: crop 35-100 % area, no flip; eval 32x32, no crop (32 px images" in start
    from clusterformer.engine.checkpoint import read_metadata

    record = read_metadata(run)["preprocess"]
    assert (record["resize"], record["resize_to"], record["crop"]) == ("square", 32, None)
    resolved = json.loads((run / "config.json").read_text())
    assert resolved["data"]["augment"]["flip"] is False
    assert resolved["run"]["augment"].startswith("augment: crop 35-100 % area, no flip")
