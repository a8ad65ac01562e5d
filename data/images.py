"""Robust image decoding: any Pillow-readable file to RGB uint8, EXIF orientation applied.

Label maps (panoptic id PNGs, semantic class PNGs) are decoded separately and keep their raw
values: converting them to RGB through a palette would destroy the labels.

Every decode refuses an image of more than :func:`max_image_pixels` pixels from its header,
before decoding it (``--max-image-pixels``; a few-KB PNG can say 12000 x 12000, 144 Mpx).
"""

from __future__ import annotations

import io
import os
import re
import warnings

import numpy as np
from PIL import Image, ImageOps

from clusterformer.data.errors import ImageDecodeError

# Suffixes treated as image members in shards and as image files in folders.
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "bmp", "webp", "tif", "tiff", "gif", "ppm", "pgm")

_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")
_BUFFER_REPR = re.compile(r"\s*<_io\.\w+ object at 0x[0-9a-fA-F]+>")

# Pillow's own warning threshold (``Image.MAX_IMAGE_PIXELS``'s default, 1 GiB of 32-bit pixels
# / 3): an RGB image at the limit is 268 MB decoded, and the pipeline holds a few copies.
DEFAULT_MAX_IMAGE_PIXELS = 89_478_485
# Carries the limit into DataLoader workers started by spawn/forkserver, which re-import this
# module instead of inheriting its state.
MAX_IMAGE_PIXELS_ENV = "CF_MAX_IMAGE_PIXELS"
FLAG = "--max-image-pixels"
_PILLOW_COUNT = re.compile(r"\((\d+) pixels\)")


def _parse_limit(value: object, what: str) -> int:
    try:
        limit = int(str(value).strip())
    except ValueError:
        limit = 0
    if limit < 1:
        raise ValueError(f"{what} must be a whole number of pixels >= 1, got {value!r}")
    return limit


_max_pixels = DEFAULT_MAX_IMAGE_PIXELS
if os.environ.get(MAX_IMAGE_PIXELS_ENV):
    _max_pixels = _parse_limit(os.environ[MAX_IMAGE_PIXELS_ENV], MAX_IMAGE_PIXELS_ENV)
    Image.MAX_IMAGE_PIXELS = _max_pixels


def set_max_image_pixels(limit: int) -> None:
    """Refuse to decode images of more than ``limit`` pixels (width x height) from now on, in
    this process and in the processes it starts (through ``CF_MAX_IMAGE_PIXELS``)."""
    global _max_pixels
    _max_pixels = _parse_limit(limit, "the image pixel limit")
    os.environ[MAX_IMAGE_PIXELS_ENV] = str(_max_pixels)
    # Pillow refuses at twice its own limit and warns above it: following ours, it neither
    # refuses an image a raised limit accepts nor warns about one we decode.
    Image.MAX_IMAGE_PIXELS = _max_pixels


def max_image_pixels() -> int:
    """The largest width x height the decode functions accept."""
    return _max_pixels


def _over_limit(where: str, pixels: int | None, size: tuple[int, int] | None = None
                ) -> ImageDecodeError:  # fmt: skip
    what = "the image is" if pixels is None else f"{pixels} pixels is"
    if size is not None:
        what = f"{size[0]} x {size[1]} = {what}"
    return ImageDecodeError(where, f"{what} over the limit of {_max_pixels}; raise it with "
                                   f"{FLAG}")  # fmt: skip


def check_pixels(width: int, height: int, where: str) -> None:
    """Raise ImageDecodeError naming ``where`` when a ``width x height`` image is over the
    limit: for any reader that knows the size before it decodes (video frames)."""
    if width * height > _max_pixels:
        raise _over_limit(where, width * height, (width, height))


def _open(data: bytes, where: str) -> Image.Image:
    try:
        with warnings.catch_warnings():
            # Pillow warns (UserWarning) on palette transparency, odd EXIF blocks and the like:
            # those images decode fine. Its size warning is the check below, with our limit.
            warnings.simplefilter("ignore", UserWarning)
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))  # reads the header only
            check_pixels(*image.size, where)
            # A frame or tile larger than the header says (Pillow checks those on load).
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image.load()  # decodes fully: a truncated file raises here, not later
    except ImageDecodeError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        # Over twice Pillow's limit (= ours), Image.open refuses before we see the size.
        count = _PILLOW_COUNT.search(str(exc))
        raise _over_limit(where, int(count.group(1)) if count else None) from None
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
            raise ImageDecodeError(
                where, f"cannot convert image mode {mode} to RGB ({exc})"
            ) from None
    return np.asarray(image, dtype=np.uint8)


def pil_to_rgb_array(image: Image.Image, where: str = "<PIL image>") -> np.ndarray:
    """An already opened PIL image as RGB uint8 ``(H, W, 3)``, by the rules a decoded file
    follows (pixel limit, 16-bit grey, alpha dropped), EXIF orientation not applied: the caller
    opened the image and chose its orientation. Raises ImageDecodeError naming ``where``."""
    check_pixels(*image.size, where)
    array = _to_rgb(image, where)
    if array.ndim != 3 or array.shape[2] != 3 or array.size == 0:
        raise ImageDecodeError(where, f"converted to an unexpected shape {array.shape}")
    return np.ascontiguousarray(array)


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


def _header(data: bytes) -> Image.Image:
    """The image opened for its header and metadata only (nothing is decoded, so no size
    limit applies: an image over it was refused when it was decoded)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        return Image.open(io.BytesIO(data))


def exif_orientation(data: bytes) -> int:
    """The EXIF orientation tag (1 = upright, 1..8), 1 when absent or unreadable."""
    try:
        with _header(data) as image:
            return int(image.getexif().get(0x0112, 1) or 1)
    except Exception:  # noqa: BLE001
        return 1


def image_format_extension(data: bytes) -> str | None:
    """The usual file suffix for the encoded bytes ("jpg", "png", ...), None if unknown."""
    try:
        with _header(data) as image:
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
