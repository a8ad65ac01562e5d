"""Robust image decoding: any Pillow-readable file to RGB uint8, EXIF orientation applied.

Label maps (panoptic id PNGs, semantic class PNGs) are decoded separately and keep their raw
values: converting them to RGB through a palette would destroy the labels.
"""

from __future__ import annotations

import io
import re
import warnings

import numpy as np
from PIL import Image, ImageOps

from clusterformer.data.errors import ImageDecodeError

# Suffixes treated as image members in shards and as image files in folders.
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "bmp", "webp", "tif", "tiff", "gif", "ppm", "pgm")

_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")
_BUFFER_REPR = re.compile(r"\s*<_io\.\w+ object at 0x[0-9a-fA-F]+>")


def _open(data: bytes, where: str) -> Image.Image:
    try:
        with warnings.catch_warnings():
            # Pillow warns (not raises) on e.g. palette transparency; those images are fine.
            warnings.simplefilter("ignore")
            image = Image.open(io.BytesIO(data))
            image.load()  # decodes fully: a truncated file raises here, not later
    except Exception as exc:  # noqa: BLE001 - Pillow raises many types for bad files
        # Pillow names the in-memory buffer ("<_io.BytesIO object at 0x...>"), not the file.
        reason = _BUFFER_REPR.sub("", " ".join(str(exc).split())).strip() or type(exc).__name__
        if not data:
            reason = "empty file"
        raise ImageDecodeError(where, f"cannot decode image ({reason})") from None
    return image


def _to_rgb(image: Image.Image, where: str) -> np.ndarray:
    mode = image.mode
    if mode in _SIXTEEN_BIT_MODES or mode == "F":
        # 16-bit grey (PNG "I;16" or "I"): keep the top 8 bits, i.e. scale 0..65535 to 0..255.
        values = np.asarray(image).astype(np.float64)
        scale = 255.0 if mode == "F" and values.max(initial=0) <= 1.0 else 1.0
        if mode != "F":
            values = values / 257.0
        grey = np.clip(np.rint(values * scale), 0, 255).astype(np.uint8)
        return np.repeat(grey[:, :, None], 3, axis=2)
    if mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if mode != "RGB":
        # Alpha is dropped (the colour under it is kept), as torchvision's RGB read mode does;
        # CMYK, L, LA, 1, YCbCr, ... all go through Pillow's own converters.
        try:
            image = image.convert("RGB")
        except Exception as exc:  # noqa: BLE001
            raise ImageDecodeError(where, f"cannot convert image mode {mode} to RGB ({exc})") from None
    return np.asarray(image, dtype=np.uint8)


def decode_image_array(data: bytes, where: str = "<bytes>") -> np.ndarray:
    """Decode encoded image bytes to an RGB array, EXIF orientation applied.

    Returns uint8 (H, W, 3). ``where`` (a path or sample key) names the input in errors.
    Raises ImageDecodeError for undecodable or truncated data.
    """
    image = _open(data, where)
    try:
        image = ImageOps.exif_transpose(image)
    except Exception:  # noqa: BLE001 - a broken EXIF block must not lose a good image
        pass
    array = _to_rgb(image, where)
    if array.ndim != 3 or array.shape[2] != 3 or array.size == 0:
        raise ImageDecodeError(where, f"decoded to an unexpected shape {array.shape}")
    return np.ascontiguousarray(array)


def decode_image(data: bytes, where: str = "<bytes>"):
    """Decode encoded image bytes to a torch tensor uint8 (3, H, W), RGB, EXIF applied."""
    import torch

    return torch.from_numpy(decode_image_array(data, where).transpose(2, 0, 1).copy())


def exif_orientation(data: bytes) -> int:
    """The EXIF orientation tag (1 = upright, 1..8), 1 when absent or unreadable."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            return int(image.getexif().get(0x0112, 1) or 1)
    except Exception:  # noqa: BLE001
        return 1


def image_format_extension(data: bytes) -> str | None:
    """The usual file suffix for the encoded bytes ("jpg", "png", ...), None if unknown."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            fmt = (image.format or "").lower()
    except Exception:  # noqa: BLE001
        return None
    return {"jpeg": "jpg", "tiff": "tif", "mpo": "jpg"}.get(fmt, fmt) or None


def decode_label_map(data: bytes, where: str = "<bytes>") -> np.ndarray:
    """Decode a single-channel class-index PNG to its raw values, int64 (H, W).

    Palette ("P") images give their palette indices, which is how VOC/ADE label PNGs store
    classes. RGB label images are rejected: their values are ambiguous.
    """
    image = _open(data, where)
    if image.mode in ("RGB", "RGBA", "CMYK", "YCbCr"):
        raise ImageDecodeError(where, f"label map must be single-channel, got mode {image.mode}")
    if image.mode == "LA":
        image = image.getchannel(0)
    return np.asarray(image).astype(np.int64)


def decode_panoptic_png(data: bytes, where: str = "<bytes>") -> np.ndarray:
    """Decode a COCO panoptic PNG to segment ids, int64 (H, W): id = R + 256 G + 256^2 B."""
    image = _open(data, where)
    if image.mode != "RGB":
        image = image.convert("RGB")
    rgb = np.asarray(image).astype(np.int64)
    return rgb[..., 0] + 256 * rgb[..., 1] + 256 * 256 * rgb[..., 2]


def encode_panoptic_ids(ids: np.ndarray) -> np.ndarray:
    """Segment ids int (H, W) to the RGB uint8 (H, W, 3) that a COCO panoptic PNG stores."""
    ids = np.asarray(ids, dtype=np.int64)
    return np.stack([ids % 256, (ids // 256) % 256, (ids // 65536) % 256], axis=-1).astype(np.uint8)
