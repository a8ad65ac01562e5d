"""Classification augmentation chosen by the data (image size, dataset size, mirror
asymmetry), --flip / --no-flip, and the start line that says what was chosen."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from clusterformer.data.augment_policy import (
    MIRROR_ASYMMETRY,
    choose_image_augment,
    mirror_asymmetry,
    peek_images,
)
from clusterformer.data.transforms import train_transform


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
    flip = train_transform("classification", 8, scale=(1.0, 1.0), ratio=(1.0, 1.0),
                          mean=(0, 0, 0), std=(1, 1, 1))  # fmt: skip
    keep = train_transform("classification", 8, scale=(1.0, 1.0), ratio=(1.0, 1.0),
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
    assert peek_images(low_res, "classification", limit=5).sizes == [(32, 32)] * 5


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


def handed_glyphs(count: int, seed: int, mirrored: bool = False) -> list[tuple[torch.Tensor, int]]:
    """``count`` 32 px images of 4 one-way-round glyphs (L, J, F, 7 drawn as bars) at random
    offsets with noise; ``mirrored``: every other image mirrored (no handedness left)."""
    g = torch.Generator().manual_seed(seed)
    bars = {0: [(4, 8, 24, 12), (20, 8, 24, 24)],  # (y0, x0, y1, x1): L
            1: [(4, 20, 24, 24), (20, 8, 24, 24)],  # J
            2: [(4, 8, 24, 12), (4, 8, 8, 24), (12, 8, 16, 20)],  # F
            3: [(4, 8, 8, 24), (4, 20, 24, 24)]}  # 7
    out = []
    for i in range(count):
        label = i % 4
        image = torch.rand(3, 32, 32, generator=g) * 60
        dy, dx = (int(v) for v in torch.randint(-3, 4, (2,), generator=g))
        for y0, x0, y1, x1 in bars[label]:
            image[:, y0 + dy:y1 + dy, x0 + dx:x1 + dx] += 180
        if mirrored and i % 8 >= 4:
            image = image.flip(-1)
        out.append((image.clamp(0, 255).to(torch.uint8), label))
    return out


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**16), count=st.integers(16, 48))
def test_mirror_asymmetry_separates_handed_from_mirror_closed_data(seed: int, count: int) -> None:
    handed = handed_glyphs(count, seed)
    assert mirror_asymmetry(*zip(*handed, strict=True)) >= MIRROR_ASYMMETRY
    # With each image's mirror in the same class the left-right differences cancel exactly:
    # what is left is minus the noise correction.
    closed = handed + [(image.flip(-1), label) for image, label in handed]
    assert mirror_asymmetry(*zip(*closed, strict=True)) <= 1e-9
    assert mirror_asymmetry(*zip(*handed_glyphs(count, seed, mirrored=True), strict=True)) < MIRROR_ASYMMETRY


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**16))
def test_mirror_asymmetry_is_one_for_identical_images_and_ignores_class_mirroring(seed: int) -> None:
    images, labels = zip(*handed_glyphs(32, seed), strict=True)
    one = images[0]
    assert mirror_asymmetry([one] * 16, [0] * 16) == pytest.approx(1.0, abs=1e-6)
    # mirroring a whole class keeps its handedness, only the other way round
    flipped = [im.flip(-1) if lab == 2 else im for im, lab in zip(images, labels, strict=True)]
    assert mirror_asymmetry(flipped, labels) == pytest.approx(mirror_asymmetry(images, labels), abs=1e-6)


def test_mirror_asymmetry_needs_enough_images_in_classes_of_two() -> None:
    images, labels = zip(*handed_glyphs(15, 0), strict=True)
    assert mirror_asymmetry(images, labels) is None  # 15 < MIRROR_MIN_IMAGES
    assert mirror_asymmetry(images[:4], range(4)) is None  # one image per class


def test_flip_choice_follows_the_asymmetry() -> None:
    assert choose_image_augment([(32, 32)], 1400, 32, asymmetry=None).flip
    assert choose_image_augment([(32, 32)], 1400, 32, asymmetry=0.05).flip
    handed = choose_image_augment([(32, 32)], 1400, 32, asymmetry=0.42)
    assert not handed.flip and "no flip: 42 %" in handed.why and "--flip" in handed.why


@pytest.fixture(scope="module")
def handed_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An ImageFolder of handed glyphs in class order (a raw folder is peeked at spread
    positions, so every class is seen, not just the first)."""
    root = tmp_path_factory.mktemp("handed")
    for i, (image, label) in enumerate(handed_glyphs(64, 1)):
        (root / f"glyph{label}").mkdir(exist_ok=True)
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(root / f"glyph{label}" / f"{i:03d}.png")
    return root


def test_peek_spreads_over_a_raw_folder(handed_folder: Path) -> None:
    peek = peek_images(handed_folder, "classification", limit=16)
    assert len(peek.sizes) == 16 and peek.mirror_asymmetry >= MIRROR_ASYMMETRY


def test_train_leaves_the_flip_off_for_handed_images_unless_told(handed_folder: Path, tmp_path: Path) -> None:
    argv = [sys.executable, "-m", "clusterformer.cli", "train", "--task", "classification",
            "--data", str(handed_folder), "--steps", "1", "--batch-size", "4",
            "--image-size", "32", "--device", "cpu"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for extra, expect in (([], "no flip"), (["--flip"], "flip")):
        run = tmp_path / f"run{len(extra)}"
        done = subprocess.run([*argv, "--out", str(run), *extra], env=env, capture_output=True,
                              text=True, timeout=300)  # fmt: skip
        assert done.returncode == 0, done.stderr
        augment = json.loads((run / "config.json").read_text())["run"]["augment"]
        assert augment.startswith(f"augment: crop 35-100 % area, {expect};"), augment
        assert ("systematic" in augment) == (not extra)
