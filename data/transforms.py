"""Task transforms: pure functions on decoded samples (see notes on the decoded-sample dict).

A sample is a plain dict with ``"image"`` (3, H, W) plus optional task fields:
``"boxes"`` float32 (n, 4) xyxy in pixels, ``"masks"`` bool (n, H, W), ``"labels"``/``"iscrowd"``/
``"isthing"``/``"segment_ids"`` (n,), ``"semantic"`` int64 (H, W) with 255 = ignore, ``"label"`` int.
Every geometric function returns a NEW dict with all of these kept consistent; inputs are never
written in place. Randomness comes only from the ``torch.Generator`` passed in, so a fixed seed
gives a fixed result.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from clusterformer.ops.images import IMAGENET_MEAN, IMAGENET_STD, normalize_image

from .rand_augment import RandAugmentPolicy, parse_rand_augment
from .rand_augment import rand_augment as apply_rand_augment
from .rand_augment import random_erasing as erase
from .sample_spec import SampleSpec, sample_spec

Sample = dict[str, Any]
Norm = tuple[float, ...] | list[float]
Transform = Callable[[Sample, "torch.Generator | None"], Sample]

IGNORE_INDEX = 255
# Per-instance fields that must be filtered together when instances are dropped.
INSTANCE_FIELDS = ("boxes", "masks", "labels", "iscrowd", "isthing", "segment_ids", "areas")


def _uniform(low: float, high: float, generator: torch.Generator | None) -> float:
    return low + (high - low) * float(torch.rand((), generator=generator))


def _randint(high: int, generator: torch.Generator | None) -> int:
    """Uniform integer in [0, high]."""
    return int(torch.randint(0, high + 1, (), generator=generator))


def image_size_of(sample: Sample) -> tuple[int, int]:
    """(H, W) of the sample's image."""
    return int(sample["image"].shape[-2]), int(sample["image"].shape[-1])


def _pil_resize(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(3, H, W) uint8 -> (3, h, w) uint8 by Pillow's antialiased bilinear resize: the exact
    pixels a PIL-and-numpy deployment computes (torch's kernel differs by 1 in ~0.3 % of
    them, which moves scores by ~1e-4)."""
    import numpy as np
    from PIL import Image

    pixels = Image.fromarray(np.ascontiguousarray(image.permute(1, 2, 0).numpy()))
    out = np.asarray(pixels.resize((int(size[1]), int(size[0])), Image.BILINEAR))
    return torch.from_numpy(out.transpose(2, 0, 1).copy())


def _resize_image(image: torch.Tensor, size: tuple[int, int], pil: bool = False) -> torch.Tensor:
    """(3, H, W) uint8 or float -> (3, h, w) same dtype; bilinear with antialias (Pillow's for
    a uint8 image with ``pil``)."""
    if tuple(image.shape[-2:]) == tuple(size):
        return image
    if pil and image.dtype == torch.uint8:
        return _pil_resize(image, size)
    # The uint8 antialias kernel is exact to within rounding and several times faster than float.
    out = F.interpolate(
        image[None], size=size, mode="bilinear", antialias=True, align_corners=False
    )
    return out[0]


def _nearest_index(in_len: int, out_len: int, start: int, count: int) -> torch.Tensor:
    """Source indices for output pixels start..start+count-1 of an in_len -> out_len nearest resize.

    Pixel-centre sampling (PyTorch's "nearest-exact"): src = floor((dst + 0.5) * in_len / out_len).
    """
    dst = torch.arange(start, start + count, dtype=torch.float64)
    return ((dst + 0.5) * (in_len / out_len)).floor().to(torch.int64).clamp_(0, in_len - 1)


def _gather_maps(maps: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """(..., H, W) -> (..., len(rows), len(cols)); a copy, so later in-place use cannot alias."""
    return maps.index_select(-2, rows).index_select(-1, cols)


def _clip_instances(out: Sample, top: int, left: int, height: int, width: int) -> Sample:
    """Shift/clip out["boxes"] (still in the uncropped frame) into the window; drop dead instances.

    ``out``'s masks must already be cropped. An instance is dropped (with its mask, label and
    other per-instance fields) when its clipped box has no area or, where masks exist, its mask
    has no pixel left, so every kept box and mask still describe something visible.
    """
    keep = None
    if "masks" in out:
        keep = out["masks"].flatten(1).any(1) if out["masks"].shape[0] else None
    if "boxes" in out:
        b = out["boxes"].to(torch.float32)
        b = torch.stack(
            [
                (b[:, 0] - left).clamp(0, width),
                (b[:, 1] - top).clamp(0, height),
                (b[:, 2] - left).clamp(0, width),
                (b[:, 3] - top).clamp(0, height),
            ],
            dim=1,
        )
        out = dict(out, boxes=b)
        alive = (b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1])
        keep = alive if keep is None else keep & alive
    if keep is None or bool(keep.all()):
        return out
    selected = dict(out)
    for name in INSTANCE_FIELDS:
        if name in out and torch.is_tensor(out[name]):
            selected[name] = out[name][keep]
    return selected


def resize(
    sample: Sample, size: tuple[int, int], window: tuple[int, int, int, int] | None = None,
    *, pil: bool = False,
) -> Sample:
    """Resize image (antialiased bilinear) and targets (nearest) to ``size`` = (h, w); boxes scaled.

    ``pil``: resize a uint8 image with Pillow (the evaluation path: what a deployment with PIL
    computes, pixel for pixel).

    With ``window`` = (top, left, height, width) in the resized frame, the result equals
    ``crop(resize(sample, size), *window)`` but masks and maps are only ever built at window size
    (an upscaled crop of 100 full-size masks would otherwise cost hundreds of MB).
    """
    h0, w0 = image_size_of(sample)
    h, w = int(size[0]), int(size[1])
    top, left, ch, cw = window if window is not None else (0, 0, h, w)
    if not (0 <= top and 0 <= left and top + ch <= h and left + cw <= w and ch > 0 and cw > 0):
        raise ValueError(f"crop window {(top, left, ch, cw)} outside image of size {(h, w)}")
    out = dict(sample)
    out["image"] = _resize_image(sample["image"], (h, w), pil)[:, top : top + ch, left : left + cw]
    rows = _nearest_index(h0, h, top, ch)
    cols = _nearest_index(w0, w, left, cw)
    if "masks" in sample:
        out["masks"] = _gather_maps(sample["masks"], rows, cols)
    if "semantic" in sample:
        out["semantic"] = _gather_maps(sample["semantic"], rows, cols)
    if "boxes" in sample:
        scale = torch.tensor([w / w0, h / h0, w / w0, h / h0], dtype=torch.float32)
        out["boxes"] = sample["boxes"].to(torch.float32) * scale
    if window is None:
        return out
    return _clip_instances(out, top, left, ch, cw)


def crop(sample: Sample, top: int, left: int, height: int, width: int) -> Sample:
    """Crop the window [top, top+height) x [left, left+width) (must lie inside the image).

    Boxes are shifted and clipped; instances left with no box area or no mask pixel are dropped.
    """
    h0, w0 = image_size_of(sample)
    if not (0 <= top and 0 <= left and top + height <= h0 and left + width <= w0):
        raise ValueError(
            f"crop window {(top, left, height, width)} outside image of size {(h0, w0)}"
        )
    out = dict(sample)
    out["image"] = sample["image"][:, top : top + height, left : left + width]
    if "semantic" in sample:
        out["semantic"] = sample["semantic"][top : top + height, left : left + width]
    if "masks" in sample:
        out["masks"] = sample["masks"][:, top : top + height, left : left + width]
    return _clip_instances(out, top, left, height, width)


def hflip(sample: Sample) -> Sample:
    """Mirror left-right; boxes become (W - x2, y1, W - x1, y2). Applying it twice is the identity."""
    _, w = image_size_of(sample)
    out = dict(sample)
    out["image"] = sample["image"].flip(-1)
    if "boxes" in sample:
        b = sample["boxes"]
        out["boxes"] = torch.stack([w - b[:, 2], b[:, 1], w - b[:, 0], b[:, 3]], dim=1)
    if "masks" in sample:
        out["masks"] = sample["masks"].flip(-1)
    if "semantic" in sample:
        out["semantic"] = sample["semantic"].flip(-1)
    return out


def random_resized_crop_params(
    height: int,
    width: int,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    generator: torch.Generator | None = None,
) -> tuple[int, int, int, int]:
    """(top, left, h, w) of a crop covering ``scale`` of the area with aspect in ``ratio``.

    Same algorithm as torchvision's RandomResizedCrop: 10 tries, then a centre crop clamped to the ratio.
    """
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * _uniform(scale[0], scale[1], generator)
        aspect = math.exp(_uniform(log_ratio[0], log_ratio[1], generator))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return _randint(height - h, generator), _randint(width - w, generator), h, w
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        h, w = height, width
    return (height - h) // 2, (width - w) // 2, h, w


def _maybe_flip(sample: Sample, generator: torch.Generator | None, flip: bool = True) -> Sample:
    # The coin is drawn even with flip off, so --no-flip changes nothing else of a seeded run.
    heads = float(torch.rand((), generator=generator)) < 0.5
    return hflip(sample) if heads and flip else sample


def finish(sample: Sample, mean: Norm, std: Norm) -> Sample:
    """Normalise the image with ``mean`` / ``std`` and record its ``size`` (the last step)."""
    out = dict(sample)
    out["image"] = normalize_image(sample["image"], mean, std)
    out["size"] = image_size_of(sample)
    return out


def classification_train(
    sample: Sample,
    image_size: int,
    generator: torch.Generator | None = None,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    rand_augment: str | RandAugmentPolicy | None = None,
    random_erasing: float = 0.0,
    flip: bool = True,
    *,
    mean: Norm = IMAGENET_MEAN,
    std: Norm = IMAGENET_STD,
) -> Sample:
    """Random-resized crop (area ``scale``, aspect ``ratio``; ImageNet's 0.08-1 and 3/4-4/3 by
    default) to image_size^2, h-flip (unless ``flip`` is False), RandAugment (timm policy string such as
    ``rand-m9-mstd0.5-inc1``, or a parsed policy; None = off) on the uint8 image, normalise
    with ``mean`` / ``std``, then random erasing with probability ``random_erasing`` (timm's, per-pixel noise)."""
    h, w = image_size_of(sample)
    top, left, ch, cw = random_resized_crop_params(
        h, w, scale=tuple(scale), ratio=tuple(ratio), generator=generator)
    out = _maybe_flip(resize(crop(sample, top, left, ch, cw), (image_size, image_size)),
                      generator, flip)
    if rand_augment is not None:
        policy = parse_rand_augment(rand_augment) if isinstance(rand_augment, str) else rand_augment
        out = dict(out, image=apply_rand_augment(out["image"], policy, generator))
    out = finish(out, mean, std)
    if random_erasing > 0:
        out["image"] = erase(out["image"], random_erasing, generator)
    return out


def _long_side_size(sample: Sample, long_side: float) -> tuple[int, int]:
    h, w = image_size_of(sample)
    s = long_side / max(h, w)
    return max(1, round(h * s)), max(1, round(w * s))


def dense_train(
    sample: Sample,
    image_size: int,
    generator: torch.Generator | None = None,
    scale_range: tuple[float, float] = (0.5, 2.0),
    flip: bool = True,
    *,
    mean: Norm = IMAGENET_MEAN,
    std: Norm = IMAGENET_STD,
) -> Sample:
    """Scale jitter (long side in scale_range x image_size), random crop to at most
    image_size x image_size, h-flip (unless ``flip`` is False), normalise. Targets follow
    every step."""
    h, w = _long_side_size(sample, image_size * _uniform(*scale_range, generator))
    ch, cw = min(h, image_size), min(w, image_size)
    window = (_randint(h - ch, generator), _randint(w - cw, generator), ch, cw)
    return finish(_maybe_flip(resize(sample, (h, w), window), generator, flip), mean, std)


TRAIN_OPTIONS: dict[str, tuple[str, ...]] = {
    "image": ("scale", "ratio", "rand_augment", "random_erasing", "flip"),
    "dense": ("scale_range", "flip"),
}
TRAIN_TRANSFORMS = {"image": classification_train, "dense": dense_train}


def train_transform(task: str | SampleSpec, image_size: int, *, mean: Norm = IMAGENET_MEAN,
                    std: Norm = IMAGENET_STD, **options: Any) -> Transform:  # fmt: skip
    """The training transform ``f(sample, generator) -> sample`` of a task (or its sample spec).

    The task's transform kind decides: ``"image"`` (random-resized crop) or ``"dense"`` (scale
    jitter + crop). Images are normalised with ``mean`` / ``std`` (the model's). ``options``
    tune the augmentation: ``"image"`` ``scale`` and ``ratio`` of the random-resized crop,
    ``rand_augment`` (timm policy string, None = off) and ``random_erasing`` (probability,
    0 = off); ``"dense"`` ``scale_range`` of the scale jitter; both ``flip`` (False: no
    horizontal flip). Unknown or malformed options raise ``ValueError``. The evaluation
    transform is :func:`.preprocess.eval_transform` of a record (it builds on this module, so
    this module does not build it).
    """
    kind = sample_spec(task).transform
    if image_size <= 0:
        raise ValueError(f"image_size must be positive, got {image_size}")
    unknown = sorted(set(options) - set(TRAIN_OPTIONS[kind]))
    if unknown:
        raise ValueError(f"unknown {kind} augmentation option(s) {', '.join(unknown)}; "
                         f"accepted: {', '.join(TRAIN_OPTIONS[kind])}")
    fn = TRAIN_TRANSFORMS[kind]
    kwargs = dict(options)
    if isinstance(kwargs.get("rand_augment"), str):  # parse once, and fail before any sample
        spec = kwargs["rand_augment"].strip()
        kwargs["rand_augment"] = None if spec.lower() == "none" else parse_rand_augment(spec)
    if not 0.0 <= float(kwargs.get("random_erasing", 0.0)) <= 1.0:
        raise ValueError(
            f"random_erasing must be a probability in [0, 1], got {kwargs['random_erasing']}"
        )
    norm = {"mean": tuple(mean), "std": tuple(std)}

    def transform(sample: Sample, generator: torch.Generator | None = None) -> Sample:
        return fn(sample, image_size, generator, **kwargs, **norm)

    return transform
