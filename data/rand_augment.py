"""RandAugment and random erasing as in timm's ImageNet recipe, on tensors (no PIL, no torchvision).

``parse_rand_augment("rand-m9-mstd0.5-inc1")`` reads timm's policy strings; ``rand_augment``
applies such a policy to one uint8 (3, H, W) image and ``random_erasing`` erases one rectangle of a
normalised float (3, H, W) image. The ops reproduce PIL's arithmetic (ImageOps LUTs, ImageEnhance
blends with truncation, ITU-R 601 integer luma, the SMOOTH kernel) so a policy means what it means
in timm; geometric ops resample bilinearly (timm: bilinear or bicubic) with fill 128 blended in
at the edge. Every random draw comes from the ``torch.Generator`` passed in (fixed seed, fixed
result).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

LEVEL_DENOM = 10.0  # magnitude scale: level / 10 is the fraction of an op's maximum strength
FILL = 128

RAND_TRANSFORMS = (
    "AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "SolarizeAdd",
    "Color", "Contrast", "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateXRel",
    "TranslateYRel",
)  # fmt: skip
RAND_INCREASING_TRANSFORMS = (
    "AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing", "SolarizeIncreasing",
    "SolarizeAdd", "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing",
    "SharpnessIncreasing", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel",
)  # fmt: skip


@dataclass(frozen=True)
class RandAugmentPolicy:
    """What a ``rand-...`` string asks for (timm's defaults where a section is absent)."""

    num_layers: int = 2  # ops drawn (with replacement) per image
    magnitude: int = 10  # 0..10 on LEVEL_DENOM's scale
    magnitude_std: float = 0.0  # per-op N(magnitude, std) noise; inf = uniform in [0, magnitude]
    increasing: bool = False  # ops whose severity grows with magnitude (timm's "inc1")
    magnitude_max: float = LEVEL_DENOM  # sampled magnitudes are clipped to [0, magnitude_max]
    prob: float = 0.5  # chance each drawn op is applied

    @property
    def ops(self) -> tuple[str, ...]:
        return RAND_INCREASING_TRANSFORMS if self.increasing else RAND_TRANSFORMS


# key -> (field, parser); values must start with a digit, as in timm's ``re.split(r"(\d.*)")``.
_SECTIONS: dict[str, tuple[str, type]] = {
    "m": ("magnitude", int),
    "n": ("num_layers", int),
    "mstd": ("magnitude_std", float),
    "mmax": ("magnitude_max", int),
    "inc": ("increasing", int),
    "p": ("prob", float),
}


def parse_rand_augment(spec: str) -> RandAugmentPolicy:
    """Parse timm's RandAugment string, e.g. ``rand-m9-n2-mstd0.5-inc1``.

    Sections after ``rand`` (any order): ``m`` magnitude (int, default 10), ``n`` ops per image
    (default 2), ``mstd`` magnitude noise std (> 100 means uniform), ``mmax`` magnitude clip
    (default 10), ``inc`` 1 = the increasing op set, ``p`` per-op probability (default 0.5).
    Unlike timm, ``inc0`` means off, and unknown or malformed sections are errors rather than
    silently ignored. Raises ``ValueError`` naming the bad part.
    """
    parts = str(spec).strip().split("-")
    if parts[0] != "rand":
        raise ValueError(f"RandAugment spec {spec!r} must start with 'rand', got {parts[0]!r}")
    values: dict[str, object] = {}
    for part in parts[1:]:
        match = re.fullmatch(r"([a-z]*)(\d.*)", part)
        if match is None or match.group(1) not in _SECTIONS:
            raise ValueError(
                f"RandAugment spec {spec!r}: bad section {part!r} "
                f"(expected one of {', '.join(k + '<number>' for k in _SECTIONS)})"
            )
        key, text = match.groups()
        name, kind = _SECTIONS[key]
        if name in values:
            raise ValueError(f"RandAugment spec {spec!r}: section {key!r} given twice")
        try:
            value = kind(text)
        except ValueError:
            raise ValueError(
                f"RandAugment spec {spec!r}: section {part!r} needs {kind.__name__} after "
                f"{key!r}, got {text!r}"
            ) from None
        values[name] = value
    if values.get("magnitude_std", 0.0) > 100:
        values["magnitude_std"] = math.inf
    if "increasing" in values:
        values["increasing"] = bool(values["increasing"])
    if "magnitude_max" in values:
        values["magnitude_max"] = float(values["magnitude_max"]) or LEVEL_DENOM  # mmax0 = default
    policy = RandAugmentPolicy(**values)
    checks = {
        "p": 0.0 <= policy.prob <= 1.0,
        "mstd": policy.magnitude_std >= 0.0 and not math.isnan(policy.magnitude_std),
    }
    for key, ok in checks.items():
        if not ok:
            raise ValueError(f"RandAugment spec {spec!r}: section {key!r} out of range")
    return policy


# --------------------------------------------------------------------------- pixel ops
def _lut(image: torch.Tensor, lut: torch.Tensor) -> torch.Tensor:
    """uint8 (3, H, W) through per-channel tables (3, 256) -> uint8 (3, H, W)."""
    flat = image.reshape(3, -1).long()
    return torch.gather(lut.to(torch.uint8), 1, flat).reshape(image.shape)


def _luma(image: torch.Tensor) -> torch.Tensor:
    """uint8 (3, H, W) -> uint8 (H, W): PIL's convert("L"), ITU-R 601-2 in 16-bit fixed point."""
    r, g, b = image.to(torch.int32).unbind(0)
    return ((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16).to(torch.uint8)


def _blend(degenerate: torch.Tensor, image: torch.Tensor, factor: float) -> torch.Tensor:
    """PIL's Image.blend: degenerate + factor * (image - degenerate), clipped, truncated."""
    d = degenerate.to(torch.float32)
    out = d + float(factor) * (image.to(torch.float32) - d)
    return out.clamp(0, 255).floor().to(torch.uint8)


def auto_contrast(image: torch.Tensor) -> torch.Tensor:
    """Stretch each channel's [min, max] to [0, 255] (ImageOps.autocontrast, cutoff 0)."""
    levels = torch.arange(256, dtype=torch.float64)
    luts = []
    for channel in image.reshape(3, -1):
        lo, hi = int(channel.min()), int(channel.max())
        if hi <= lo:
            luts.append(levels)
            continue
        scale = 255.0 / (hi - lo)
        luts.append((levels * scale - lo * scale).trunc().clamp(0, 255))
    return _lut(image, torch.stack(luts))


def equalize(image: torch.Tensor) -> torch.Tensor:
    """Histogram-equalise each channel (ImageOps.equalize's table)."""
    luts = []
    for channel in image.reshape(3, -1):
        hist = torch.bincount(channel.long(), minlength=256)
        used = hist[hist > 0]
        step = int(used.sum() - used[-1]) // 256 if used.numel() > 1 else 0
        if step == 0:
            luts.append(torch.arange(256))
            continue
        before = torch.cumsum(hist, 0) - hist
        luts.append(((step // 2 + before) // step).clamp(0, 255))
    return _lut(image, torch.stack(luts))


def invert(image: torch.Tensor) -> torch.Tensor:
    return 255 - image


def posterize(image: torch.Tensor, bits: int) -> torch.Tensor:
    """Keep the ``bits`` most significant bits (0 gives black; >= 8 is the identity)."""
    bits = max(int(bits), 0)
    if bits >= 8:
        return image.clone()
    return image & ((0xFF << (8 - bits)) & 0xFF)


def solarize(image: torch.Tensor, threshold: int) -> torch.Tensor:
    """Invert pixels >= threshold (256 is the identity, 0 inverts everything)."""
    # Compared in int16: a uint8 comparison would wrap a threshold of 256 to 0.
    return torch.where(image.to(torch.int16) < int(threshold), image, 255 - image)


def solarize_add(image: torch.Tensor, add: int, threshold: int = 128) -> torch.Tensor:
    """Add ``add`` (saturating) to pixels below threshold."""
    raised = (image.to(torch.int16) + int(add)).clamp(0, 255).to(torch.uint8)
    return torch.where(image < threshold, raised, image)


def color(image: torch.Tensor, factor: float) -> torch.Tensor:
    """Blend with the grayscale image (0 gray, 1 identity, > 1 more saturated)."""
    return _blend(_luma(image).expand_as(image), image, factor)


def contrast(image: torch.Tensor, factor: float) -> torch.Tensor:
    """Blend with a flat image at the rounded mean luma."""
    mean = int(_luma(image).double().mean() + 0.5)
    return _blend(torch.full_like(image, mean), image, factor)


def brightness(image: torch.Tensor, factor: float) -> torch.Tensor:
    """Blend with black (factor 1 is the identity)."""
    return _blend(torch.zeros_like(image), image, factor)


def sharpness(image: torch.Tensor, factor: float) -> torch.Tensor:
    """Blend with PIL's SMOOTH-filtered image (kernel [[1,1,1],[1,5,1],[1,1,1]]/13, border kept)."""
    smooth = image.clone()
    if image.shape[-1] > 2 and image.shape[-2] > 2:
        x = image.to(torch.int32)
        h, w = x.shape[-2:]
        sums = 4 * x[:, 1:-1, 1:-1]  # centre weight 5 = 1 from the 3x3 box + 4
        for dy in range(3):
            for dx in range(3):
                sums = sums + x[:, dy : h - 2 + dy, dx : w - 2 + dx]
        smooth[:, 1:-1, 1:-1] = ((2 * sums + 13) // 26).to(torch.uint8)  # round(sums / 13)
    return _blend(smooth, image, factor)


def _affine(image: torch.Tensor, coeffs: tuple[float, ...]) -> torch.Tensor:
    """PIL's Image.transform(AFFINE, coeffs): output pixel centre (x, y) samples the input at
    (a x + b y + c, d x + e y + f); bilinear, outside filled with FILL."""
    a, b, c, d, e, f = coeffs
    h, w = image.shape[-2:]
    ys = torch.arange(h, dtype=torch.float32) + 0.5
    xs = torch.arange(w, dtype=torch.float32) + 0.5
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")
    grid = torch.stack(
        [(a * xx + b * yy + c) * (2.0 / w) - 1.0, (d * xx + e * yy + f) * (2.0 / h) - 1.0], -1
    )
    # Sampling (image - FILL) with zero padding, then adding FILL back, fills the outside.
    shifted = image[None].to(torch.float32) - FILL
    out = F.grid_sample(shifted, grid[None], mode="bilinear", padding_mode="zeros",
                        align_corners=False)[0] + FILL  # fmt: skip
    return out.round().clamp(0, 255).to(torch.uint8)


def rotate(image: torch.Tensor, degrees: float) -> torch.Tensor:
    """Rotate counter-clockwise by ``degrees`` about the image centre (PIL's Image.rotate)."""
    h, w = image.shape[-2:]
    angle = -math.radians(degrees)
    a, b = round(math.cos(angle), 15), round(math.sin(angle), 15)
    d, e = -b, a
    cx, cy = w / 2.0, h / 2.0
    return _affine(image, (a, b, cx - a * cx - b * cy, d, e, cy - d * cx - e * cy))


def shear_x(image: torch.Tensor, factor: float) -> torch.Tensor:
    return _affine(image, (1.0, factor, 0.0, 0.0, 1.0, 0.0))


def shear_y(image: torch.Tensor, factor: float) -> torch.Tensor:
    return _affine(image, (1.0, 0.0, 0.0, factor, 1.0, 0.0))


def translate_x_rel(image: torch.Tensor, fraction: float) -> torch.Tensor:
    """Content moves left by fraction x width (right when negative)."""
    return _affine(image, (1.0, 0.0, fraction * image.shape[-1], 0.0, 1.0, 0.0))


def translate_y_rel(image: torch.Tensor, fraction: float) -> torch.Tensor:
    return _affine(image, (1.0, 0.0, 0.0, 0.0, 1.0, fraction * image.shape[-2]))


# --------------------------------------------------------------------------- levels -> arguments
_LevelFn = Callable[[float, torch.Generator | None], tuple]


def _negate(value: float, generator: torch.Generator | None) -> float:
    return -value if float(torch.rand((), generator=generator)) > 0.5 else value


def _signed(scale: float) -> _LevelFn:
    return lambda level, g: (_negate(level / LEVEL_DENOM * scale, g),)


def _enhance(level: float, _g: torch.Generator | None) -> tuple:
    return (level / LEVEL_DENOM * 1.8 + 0.1,)  # [0.1, 1.9], weakest at 0


def _enhance_increasing(level: float, g: torch.Generator | None) -> tuple:
    return (max(0.1, 1.0 + _negate(level / LEVEL_DENOM * 0.9, g)),)  # 1 (no change) at 0


def _posterize_bits(level: float) -> int:
    return int(level / LEVEL_DENOM * 4)


def _solarize_threshold(level: float) -> int:
    return int(level / LEVEL_DENOM * 256)


OPS: dict[str, tuple[Callable[..., torch.Tensor], _LevelFn | None]] = {
    "AutoContrast": (auto_contrast, None),
    "Equalize": (equalize, None),
    "Invert": (invert, None),
    "Rotate": (rotate, _signed(30.0)),
    "Posterize": (posterize, lambda lv, g: (_posterize_bits(lv),)),
    "PosterizeIncreasing": (posterize, lambda lv, g: (4 - _posterize_bits(lv),)),
    "Solarize": (solarize, lambda lv, g: (_solarize_threshold(lv),)),
    "SolarizeIncreasing": (solarize, lambda lv, g: (256 - _solarize_threshold(lv),)),
    "SolarizeAdd": (solarize_add, lambda lv, g: (int(lv / LEVEL_DENOM * 110),)),
    "Color": (color, _enhance),
    "ColorIncreasing": (color, _enhance_increasing),
    "Contrast": (contrast, _enhance),
    "ContrastIncreasing": (contrast, _enhance_increasing),
    "Brightness": (brightness, _enhance),
    "BrightnessIncreasing": (brightness, _enhance_increasing),
    "Sharpness": (sharpness, _enhance),
    "SharpnessIncreasing": (sharpness, _enhance_increasing),
    "ShearX": (shear_x, _signed(0.3)),
    "ShearY": (shear_y, _signed(0.3)),
    "TranslateXRel": (translate_x_rel, _signed(0.45)),
    "TranslateYRel": (translate_y_rel, _signed(0.45)),
}


def _check_image(image: torch.Tensor) -> None:
    if image.dtype != torch.uint8 or image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(
            f"RandAugment needs a uint8 (3, H, W) image, got {image.dtype} {tuple(image.shape)}"
        )


def apply_op(
    image: torch.Tensor, name: str, level: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Apply op ``name`` at magnitude ``level`` (0..10; signed ops draw a random sign).

    uint8 (3, H, W) -> new uint8 (3, H, W); the input is not modified.
    """
    _check_image(image)
    if name not in OPS:
        raise ValueError(f"unknown RandAugment op {name!r}; expected one of {', '.join(OPS)}")
    fn, level_fn = OPS[name]
    args = level_fn(float(level), generator) if level_fn is not None else ()
    return fn(image, *args)


def _sample_level(policy: RandAugmentPolicy, generator: torch.Generator | None) -> float:
    level = float(policy.magnitude)
    if policy.magnitude_std == math.inf:
        level = level * float(torch.rand((), generator=generator))
    elif policy.magnitude_std > 0:
        level = level + policy.magnitude_std * float(torch.randn((), generator=generator))
    return min(max(level, 0.0), policy.magnitude_max)


def rand_augment(
    image: torch.Tensor, policy: RandAugmentPolicy, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Draw ``policy.num_layers`` ops (with replacement); apply each with ``policy.prob`` at a
    magnitude drawn around ``policy.magnitude``. uint8 (3, H, W) -> new uint8 (3, H, W)."""
    _check_image(image)
    names = policy.ops
    chosen = torch.randint(len(names), (policy.num_layers,), generator=generator).tolist()
    out = image
    for index in chosen:
        if float(torch.rand((), generator=generator)) > policy.prob:
            continue
        out = apply_op(out, names[index], _sample_level(policy, generator), generator)
    return out.clone() if out is image else out


# --------------------------------------------------------------------------- random erasing
ERASE_MODES = ("pixel", "rand", "const")


def random_erasing(
    image: torch.Tensor,
    probability: float,
    generator: torch.Generator | None = None,
    area: tuple[float, float] = (0.02, 1 / 3),
    log_ratio: tuple[float, float] = (math.log(0.3), math.log(1 / 0.3)),
    mode: str = "pixel",
) -> torch.Tensor:
    """timm's RandomErasing (one box): with ``probability`` replace one rectangle covering
    ``area`` of the image, aspect exp(U(log_ratio)), by N(0, 1) noise per pixel ("pixel"), per
    channel ("rand") or zeros ("const"); 10 placement tries. Float (3, H, W), normalised ->
    new float (3, H, W); the input is not modified."""
    if not 0.0 <= probability <= 1.0:
        raise ValueError(f"random erasing probability must be in [0, 1], got {probability}")
    if mode not in ERASE_MODES:
        raise ValueError(f"random erasing mode must be one of {', '.join(ERASE_MODES)}, got {mode!r}")
    out = image.clone()
    if probability == 0.0 or float(torch.rand((), generator=generator)) > probability:
        return out
    chans, h, w = image.shape[-3:]
    for _ in range(10):
        target = (area[0] + (area[1] - area[0]) * float(torch.rand((), generator=generator))) * h * w
        aspect = math.exp(
            log_ratio[0] + (log_ratio[1] - log_ratio[0]) * float(torch.rand((), generator=generator))
        )
        eh, ew = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if ew < w and eh < h:
            top = int(torch.randint(0, h - eh + 1, (), generator=generator))
            left = int(torch.randint(0, w - ew + 1, (), generator=generator))
            shape = {"pixel": (chans, eh, ew), "rand": (chans, 1, 1), "const": None}[mode]
            fill = (torch.zeros(()) if shape is None
                    else torch.randn(shape, generator=generator))  # fmt: skip
            out[..., top : top + eh, left : left + ew] = fill.to(out.dtype)
            break
    return out
