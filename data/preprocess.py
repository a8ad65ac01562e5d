"""The evaluation preprocessing as one typed record, and the one function that builds the eval
transform from it.

A checkpoint stores its :class:`EvalPreprocess` (``preprocess`` in its metadata); the loader,
``cf eval``, ``cf predict`` and ``cf export``'s metadata all read that record, so the pixels a
model sees at inference are the ones it was evaluated on. A deployment outside Python applies
it with PIL and numpy (README, "Export and deployment"):

1. decode to RGB uint8, ``H x W``;
2. resize with PIL's ``Image.BILINEAR`` (antialiased; the library resizes with Pillow here
   too, so the pixels are identical) by ``resize``:

   * ``"short_side"``: the short side to ``resize_to``, the long side to
     ``max(resize_to, round(long * resize_to / short))``;
   * ``"long_side"``: the long side to ``resize_to``, the other to
     ``max(1, round(side * resize_to / long))``;
   * ``"square"``: to ``resize_to x resize_to`` (no resize when the image already is);

3. with ``crop`` set, cut the centre ``crop x crop`` window at
   ``((h - crop) // 2, (w - crop) // 2)`` of the resized image;
4. ``pixels / 255``, then ``(x - mean) / std`` per channel; NCHW float32.

``round`` is Python's (halves to even), as both sides compute it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

import torch

from clusterformer.ops.images import IMAGENET_MEAN, IMAGENET_STD

from .errors import ImageDecodeError
from .images import DEFAULT_MAX_IMAGE_PIXELS, FLAG, max_image_pixels
from .sample_spec import TRANSFORM_KINDS
from .transforms import Sample, Transform, finish, image_size_of, resize

RESIZE_RULES: tuple[str, ...] = ("short_side", "long_side", "square")
# The largest side a record may ask for: 4x the largest inference size in use (4096, the
# export's dynamic range), and a float32 RGB square of it is already 3.2 GB. A damaged or
# hostile record (size 10**6) is refused when the checkpoint loads, not by a MemoryError later.
MAX_PREPROCESS_SIDE = 16384
# ImageNet's evaluation: resize the short side to 256 and centre-crop 224.
EVAL_RESIZE_RATIO = 256 / 224


def resize_pixel_limit() -> int:
    """The most pixels a record's resize may make: the decode limit, but never below its
    default (lowering ``--max-image-pixels`` guards decoding untrusted files; the model's own
    input size, e.g. 256 x 256, is no such file)."""
    return max(max_image_pixels(), DEFAULT_MAX_IMAGE_PIXELS)


@dataclass(frozen=True)
class EvalPreprocess:
    """How an image becomes the model's input at evaluation (see the module docstring).

    Attributes:
        resize: ``"short_side"``, ``"long_side"`` or ``"square"``.
        resize_to: the target side of that rule, in pixels.
        crop: side of the centre crop after the resize; ``None``: no crop.
        mean, std: per-channel normalisation of ``pixels / 255`` (the model's).
        size: the training image size the record was made for (``--image-size`` of training).
    """

    resize: str
    resize_to: int
    crop: int | None
    mean: tuple[float, ...]
    std: tuple[float, ...]
    size: int

    def __post_init__(self) -> None:
        if self.resize not in RESIZE_RULES:
            raise ValueError(f"preprocess.resize must be one of {', '.join(RESIZE_RULES)}, "
                             f"got {self.resize!r}")  # fmt: skip
        sides = {"resize_to": self.resize_to, "crop": self.crop, "size": self.size}
        if any(v is not None and not 1 <= v <= MAX_PREPROCESS_SIDE for v in sides.values()):
            raise ValueError(f"preprocess sizes must be 1 to {MAX_PREPROCESS_SIDE} px, got "
                             + ", ".join(f"{k}={v}" for k, v in sides.items()))  # fmt: skip
        # square and short_side make at least R x R (long_side R x 1: the side bound is enough).
        smallest = self.resize_to**2
        if self.resize != "long_side" and smallest > (limit := resize_pixel_limit()):
            raise ValueError(f"preprocess resizes every image to at least {self.resize_to} x "
                             f"{self.resize_to} = {smallest} pixels, over the limit of {limit} "
                             f"({FLAG})")  # fmt: skip
        if self.crop is not None and self.resize == "square" and self.crop > self.resize_to:
            raise ValueError(f"preprocess.crop {self.crop} is larger than the "
                             f"{self.resize_to} px square it is cut from")  # fmt: skip
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError(f"preprocess.mean/std must be 3 values (std > 0), got "
                             f"{list(self.mean)} / {list(self.std)}")  # fmt: skip

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON values (what the checkpoint and the export metadata store)."""
        out = asdict(self)
        out["mean"], out["std"] = list(self.mean), list(self.std)
        return out

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> EvalPreprocess:
        """The record from :meth:`to_dict`'s output; ValueError naming what is wrong."""
        known = {"resize", "resize_to", "crop", "mean", "std", "size"}
        if not isinstance(values, dict) or not known <= set(values):
            missing = sorted(known - set(values)) if isinstance(values, dict) else sorted(known)
            raise ValueError(f"preprocess record lacks {', '.join(missing)}")
        crop = values["crop"]
        try:
            resize_to, size = int(values["resize_to"]), int(values["size"])
            crop = None if crop is None else int(crop)
        except (TypeError, OverflowError) as exc:  # a list, an infinity: not a size
            raise ValueError(f"preprocess sizes must be whole numbers ({exc})") from None
        return cls(str(values["resize"]), resize_to, crop,
                   tuple(float(v) for v in values["mean"]),
                   tuple(float(v) for v in values["std"]), size)  # fmt: skip

    def at_size(self, size: int) -> EvalPreprocess:
        """The same rule for another inference size (``--image-size`` of eval / predict):
        every side scales by ``size / self.size``."""
        if size == self.size:
            return self
        scale = size / self.size
        crop = None if self.crop is None else size
        return replace(self, resize_to=max(1, round(self.resize_to * scale)), crop=crop, size=size)

    def describe(self) -> str:
        """One short phrase, e.g. ``short side 256, centre crop 224``."""
        rule = {"short_side": f"short side {self.resize_to}",
                "long_side": f"long side {self.resize_to}",
                "square": f"{self.resize_to}x{self.resize_to}"}[self.resize]  # fmt: skip
        return rule + (f", centre crop {self.crop}" if self.crop is not None else ", no crop")


def default_eval_preprocess(
    kind: str, image_size: int, *, mean: Any = IMAGENET_MEAN,
    std: Any = IMAGENET_STD, native: bool = False,
) -> EvalPreprocess:  # fmt: skip
    """The record a checkpoint without one gets (today's behaviour), or a new run's, for a
    task's transform ``kind`` (:attr:`SampleSpec.transform`).

    ``"image"`` transforms: ImageNet's resize of the short side to ``image_size * 256/224``
    then a centre crop of ``image_size``; with ``native`` (the images already have the
    training size) a plain ``image_size`` square, no crop. ``"dense"``: the long side to
    ``image_size``, no crop (predictions map back to the image by one resize).
    """
    if image_size < 1:
        raise ValueError(f"image_size must be positive, got {image_size}")
    norm = {"mean": tuple(float(v) for v in mean), "std": tuple(float(v) for v in std)}
    if kind not in TRANSFORM_KINDS:
        raise ValueError(f"unknown transform kind {kind!r}; expected {', '.join(TRANSFORM_KINDS)}")
    if kind == "dense":
        return EvalPreprocess("long_side", image_size, None, size=image_size, **norm)
    if native:
        return EvalPreprocess("square", image_size, None, size=image_size, **norm)
    short = max(round(image_size * EVAL_RESIZE_RATIO), image_size)
    return EvalPreprocess("short_side", short, image_size, size=image_size, **norm)


def resized_shape(pre: EvalPreprocess, height: int, width: int) -> tuple[int, int]:
    """``(h, w)`` after the record's resize of an ``height x width`` image."""
    r = pre.resize_to
    if pre.resize == "square":
        return r, r
    if pre.resize == "long_side":
        s = r / max(height, width)
        return max(1, round(height * s)), max(1, round(width * s))
    s = r / min(height, width)
    if height <= width:
        return r, max(r, round(width * s))
    return max(r, round(height * s)), r


def apply_preprocess(pre: EvalPreprocess, sample: Sample) -> Sample:
    """One sample through the record (targets follow the resize and crop).

    Raises ImageDecodeError (naming the sample's key) when the resized image would be over
    :func:`resize_pixel_limit`: an extreme aspect ratio (1 x 80M px) scaled to a short side
    of 256 is billions of pixels.
    """
    height, width = image_size_of(sample)
    nh, nw = resized_shape(pre, height, width)
    limit = resize_pixel_limit()
    if nh * nw > limit:
        raise ImageDecodeError(str(sample.get("key", "<image>")),
                               f"{width} x {height} resized by the checkpoint's preprocess "
                               f"({pre.describe()}) is {nw} x {nh} = {nw * nh} pixels, over the "
                               f"limit of {limit}; raise it with {FLAG}")  # fmt: skip
    window = None
    if pre.crop is not None:
        side = pre.crop
        if side > min(nh, nw):
            raise ValueError(f"centre crop {side} is larger than the resized image {nh}x{nw}")
        window = ((nh - side) // 2, (nw - side) // 2, side, side)
    return finish(resize(sample, (nh, nw), window, pil=True), pre.mean, pre.std)


def as_record(pre: EvalPreprocess | dict[str, Any]) -> EvalPreprocess:
    """A record, or its :meth:`EvalPreprocess.to_dict` form, as a record."""
    return pre if isinstance(pre, EvalPreprocess) else EvalPreprocess.from_dict(pre)


def eval_transform(pre: EvalPreprocess | dict[str, Any]) -> Transform:
    """The evaluation transform ``f(sample, generator) -> sample`` of a record (the one place
    an eval transform is built: loader, ``cf eval``, ``cf predict``)."""
    record = as_record(pre)

    def transform(sample: Sample, generator: torch.Generator | None = None) -> Sample:
        return apply_preprocess(record, sample)

    return transform
