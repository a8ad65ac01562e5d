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
* flip: on, unless the images have a handedness. A random flip assumes that a mirrored image
  is as likely as the original and has its label, true of photos, false of digits, text or
  anything drawn one way round. The data says which: within a class, photos are taken from
  either side, so an image's left-right difference (the image minus its mirror) averages out,
  while every "3" bulges to the right. :func:`mirror_asymmetry` measures the part of that
  difference that is systematic within classes (about 0.4 on handwritten digits, under 0.07
  on flower photos and on COCO object crops); at :data:`MIRROR_ASYMMETRY` or above the flip is
  left off. ``--flip`` / ``--no-flip`` decide instead.

:func:`peek_images` reads a sample of the dataset (a shard folder or a raw folder: up to
:data:`PEEK` images, spread over a raw folder, the first ones of a shuffled shard folder) so
the choice costs about a second at start.
"""

from __future__ import annotations

import os
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.nn import functional as F

from .errors import DatasetError
from .sample_spec import SampleSpec, sample_spec
from .streams import RawSource, shard_source, url_list

IMAGENET_SCALE = (0.08, 1.0)
LOW_RES_SCALE = (0.35, 1.0)
SMALL_DATA_SCALE = (0.25, 1.0)
LOW_RES_SIDE = 64
SMALL_DATASET = 5000
PEEK = 128
# Flip off at or above this share of systematic left-right difference (module docstring).
MIRROR_ASYMMETRY = 0.15
# The check needs this many images in classes with at least two of them; fewer: flip on.
MIRROR_MIN_IMAGES = 16
MIRROR_SIDE = 16  # images are compared as 16x16 grey: shape, not texture


@dataclass(frozen=True)
class ImageAugmentChoice:
    """What :func:`choose_image_augment` decided, and why (for the start line)."""

    scale: tuple[float, float]
    native: bool
    why: str
    flip: bool = True


@dataclass(frozen=True)
class DataPeek:
    """What :func:`peek_images` saw: ``(H, W)`` of each image read and their
    :func:`mirror_asymmetry` (None when it could not be measured)."""

    sizes: list[tuple[int, int]]
    mirror_asymmetry: float | None


def mirror_asymmetry(images: Sequence[Tensor], labels: Sequence[int]) -> float | None:
    """The share of the images' left-right difference that is systematic within a class.

    Each image becomes a ``MIRROR_SIDE`` x ``MIRROR_SIDE`` grey map ``g``, standardised, and
    ``d = g - flip(g)``. Per class ``c`` with ``n >= 2`` images, ``|mean(d)|^2`` less its
    sampling noise ``trace(cov(d)) / n`` is the systematic part and ``mean(|d|^2)`` the whole;
    the result is their ratio summed over classes (weighted by ``n``): 0 when mirrored images
    are as likely as the originals, 1 when every image of a class has the same handedness.

    Args:
        images: ``(C, H, W)`` tensors (any size, any dtype, 1 or 3 channels).
        labels: one class index per image.

    Returns:
        The share (may be slightly negative by noise), or None with fewer than
        ``MIRROR_MIN_IMAGES`` images in classes of two or more, or no left-right difference.
    """
    by_class: dict[int, list[Tensor]] = {}
    for image, label in zip(images, labels, strict=True):
        grey = image.float().mean(0, keepdim=True)[None]
        small = F.interpolate(grey, size=(MIRROR_SIDE, MIRROR_SIDE), mode="bilinear",
                              antialias=True, align_corners=False).flatten()  # fmt: skip
        small = (small - small.mean()) / small.std().clamp_min(1e-6)
        flipped = small.view(MIRROR_SIDE, MIRROR_SIDE).flip(-1).flatten()
        by_class.setdefault(int(label), []).append(small - flipped)
    systematic = whole = 0.0
    counted = 0
    for diffs in by_class.values():
        n = len(diffs)
        if n < 2:
            continue
        d = torch.stack(diffs).double()  # (n, MIRROR_SIDE ** 2)
        mean = d.mean(0)
        systematic += n * float(mean @ mean - d.var(0, unbiased=True).sum() / n)
        whole += n * float((d * d).sum(1).mean())
        counted += n
    if counted < MIRROR_MIN_IMAGES or whole <= 0.0:
        return None
    return systematic / whole


def choose_image_augment(
    sizes: Sequence[tuple[int, int]], num_samples: int, image_size: int,
    asymmetry: float | None = None,
) -> ImageAugmentChoice:  # fmt: skip
    """The crop scale, eval rule and flip for ``"image"`` transforms (module docstring).

    Args:
        sizes: ``(H, W)`` of some of the dataset's images (at least one).
        num_samples: images in the training set.
        image_size: the training crop size.
        asymmetry: their :func:`mirror_asymmetry` (None: unknown, flip on).
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
    flip = asymmetry is None or asymmetry < MIRROR_ASYMMETRY
    if not flip:
        why += (f"; no flip: {asymmetry * 100:.0f} % of the images' left-right difference is "
                f"systematic (>= {MIRROR_ASYMMETRY * 100:.0f} %), --flip to force")  # fmt: skip
    return ImageAugmentChoice(scale, native, why, flip)


_PEEKED: dict[tuple, DataPeek] = {}


def peek_images(
    path: str | os.PathLike | Sequence[str], task: str | SampleSpec, limit: int = PEEK
) -> DataPeek:
    """Sizes and mirror asymmetry of up to ``limit`` decodable images of a shard folder, shard
    URLs or a raw dataset folder (undecodable ones are passed over: the loader reports them).
    A raw folder is read at evenly spaced positions (it is in class order), shards from the
    start (``cf shard-dataset`` shuffles them). Kept per process: ``cf train``'s start line
    and the training loop ask the same question."""
    spec = sample_spec(task)
    has_index = url_list(path) is not None or (Path(path) / "dataset.json").is_file()
    where = [str(p) for p in path] if not isinstance(path, str | os.PathLike) else [str(path)]
    stamp = tuple(os.stat(p).st_mtime_ns if os.path.exists(p) else 0 for p in where)
    cache_key = (tuple(where), stamp, spec, limit)
    if cache_key in _PEEKED:
        return _PEEKED[cache_key]
    source: Any = shard_source(path, None) if has_index else RawSource(str(path), spec.formats)
    stride = 1 if has_index else max(1, sum(source.counts) // limit)
    sizes: list[tuple[int, int]] = []
    images, labels = [], []
    first = 0
    for unit, count in enumerate(source.counts):
        keep = lambda pos, first=first: (first + pos) % stride == 0  # noqa: E731
        first += count
        try:
            for _, members in source.read(unit, keep):
                try:
                    sample = source.decode(members)
                except (ValueError, OSError):
                    continue
                image = sample["image"]
                sizes.append((int(image.shape[-2]), int(image.shape[-1])))
                label = sample.get(spec.label_field) if spec.label_field else None
                if isinstance(label, int):
                    images.append(image)
                    labels.append(label)
                if len(sizes) >= limit:
                    break
        except DatasetError:  # a damaged shard: the loader reports it (or skips it)
            continue
        if len(sizes) >= limit:
            break
    peek = DataPeek(sizes, mirror_asymmetry(images, labels) if images else None)
    _PEEKED[cache_key] = peek
    return peek
