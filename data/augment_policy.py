"""Classification augmentation chosen by the data: image size and dataset size.

ImageNet's recipe (random-resized crop of 8-100 % of the area, horizontal flip, evaluation at
the short side ``256/224 x`` the crop size then a centre crop) was tuned for 1.28 M photos of
~400 px. On small or low-resolution data it throws information away: an 8 % crop of a 32 px
image is a 9 px patch upscaled, and a centre crop of an image that already is the training
size cuts its border off (the digit, the object) instead of a margin. So:

* crop scale: ``(0.35, 1)`` when the median short side is below :data:`LOW_RES_SIDE` px;
  ``(0.25, 1)`` for photos when the dataset has fewer than :data:`SMALL_DATASET` images (a
  model that sees each image a few dozen times learns more from crops that still show the
  object); ImageNet's ``(0.08, 1)`` otherwise;
* evaluation: no centre crop (a plain square resize to the training size) when the images
  are already at most the size ImageNet's evaluation would resize them to
  (``image_size * 256/224``), i.e. when there is no margin to crop;
* flip: on unless the user turns it off (``--no-flip``: text, digits, anything a mirror image
  changes the class of); that is a fact about the labels, which no size tells.

:func:`peek_image_sizes` reads the first images of a dataset (a shard folder or a raw folder)
so the choice costs a fraction of a second at start.
"""

from __future__ import annotations

import os
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .sample_spec import SampleSpec, sample_spec
from .streams import RawSource, shard_source, url_list

IMAGENET_SCALE = (0.08, 1.0)
LOW_RES_SCALE = (0.35, 1.0)
SMALL_DATA_SCALE = (0.25, 1.0)
LOW_RES_SIDE = 64
SMALL_DATASET = 5000
PEEK = 32


@dataclass(frozen=True)
class ImageAugmentChoice:
    """What :func:`choose_image_augment` decided, and why (for the start line)."""

    scale: tuple[float, float]
    native: bool
    why: str


def choose_image_augment(
    sizes: Sequence[tuple[int, int]], num_samples: int, image_size: int
) -> ImageAugmentChoice:
    """The crop scale and eval rule for ``"image"`` transforms (see the module docstring).

    Args:
        sizes: ``(H, W)`` of some of the dataset's images (at least one).
        num_samples: images in the training set.
        image_size: the training crop size.
    """
    if not sizes:
        raise ValueError("no image to choose the augmentation from")
    short = statistics.median(min(h, w) for h, w in sizes)
    longest = max(max(h, w) for h, w in sizes)
    side = f"{round(short)} px images"
    if short < LOW_RES_SIDE:
        scale, why = LOW_RES_SCALE, f"{side} (< {LOW_RES_SIDE} px)"
    elif num_samples < SMALL_DATASET:
        scale, why = SMALL_DATA_SCALE, f"{side}, {num_samples} images (< {SMALL_DATASET})"
    else:
        scale, why = IMAGENET_SCALE, f"{side}, {num_samples} images"
    native = longest <= round(image_size * 256 / 224)
    return ImageAugmentChoice(scale, native, why)


def peek_image_sizes(
    path: str | os.PathLike | Sequence[str], task: str | SampleSpec, limit: int = PEEK
) -> list[tuple[int, int]]:
    """``(H, W)`` of the first ``limit`` decodable images of a shard folder, shard URLs or a
    raw dataset folder (undecodable ones are passed over: the loader reports them)."""
    spec = sample_spec(task)
    has_index = url_list(path) is not None or (Path(path) / "dataset.json").is_file()
    source: Any = shard_source(path, None) if has_index else RawSource(str(path), spec.formats)
    sizes: list[tuple[int, int]] = []
    for unit in range(len(source.counts)):
        for _, members in source.read(unit, lambda pos: True):
            try:
                image = source.decode(members)["image"]
            except (ValueError, OSError):
                continue
            sizes.append((int(image.shape[-2]), int(image.shape[-1])))
            if len(sizes) >= limit:
                return sizes
    return sizes
