"""What a :class:`~clusterformer.inference.Predictor` accepts as an image, turned into the one
form the model side reads: a decoded RGB uint8 ``(3, H, W)`` tensor.

* a path (``str`` or :class:`pathlib.Path`): decoded as ``cf predict`` decodes files (EXIF
  orientation applied, the pixel limit checked from the header);
* a :class:`PIL.Image.Image`: converted to RGB by the same rules (16-bit grey, alpha dropped);
* a numpy array ``(H, W, 3)`` uint8 (RGB) or ``(H, W)`` uint8 (grey);
* a torch tensor ``(3, H, W)``: uint8, or floating point in ``[0, 1]`` (torchvision's
  ``to_tensor`` convention), rounded to uint8 as the model side resizes uint8 pixels.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from clusterformer.data.images import check_pixels, decode_image, pil_to_rgb_array

IN_MEMORY = "<image>"


def describe_kind(image: Any) -> str:
    """A short name of what ``image`` is, for error messages."""
    if isinstance(image, np.ndarray | torch.Tensor):
        return f"{type(image).__name__} of shape {tuple(image.shape)} and dtype {image.dtype}"
    return type(image).__name__


def decode_input(image: Any) -> tuple[torch.Tensor, str | None]:
    """``image`` (see the module docstring) -> (RGB uint8 ``(3, H, W)`` on the CPU, the path
    as given or None for an in-memory image).

    Raises:
        FileNotFoundError / OSError: a path that cannot be read.
        ImageDecodeError (ValueError): a file that does not decode, an image over the pixel limit.
        TypeError: anything else; ValueError: an array or tensor of the wrong shape or range.
    """
    if isinstance(image, str | Path):
        path = Path(image)
        return decode_image(path.read_bytes(), str(image)), str(image)
    if isinstance(image, np.ndarray):
        return _from_array(image), None
    if isinstance(image, torch.Tensor):
        return _from_tensor(image), None
    from PIL import Image

    if isinstance(image, Image.Image):
        return torch.from_numpy(pil_to_rgb_array(image).transpose(2, 0, 1).copy()), None
    raise TypeError(f"cannot predict on a {describe_kind(image)}: give a path, a PIL image, a "
                    "numpy (H, W, 3) uint8 array or a torch (3, H, W) tensor")  # fmt: skip


def _from_array(array: np.ndarray) -> torch.Tensor:
    if array.dtype != np.uint8 or not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] == 3)):
        raise ValueError(f"expected a numpy (H, W, 3) or (H, W) uint8 array, got a "
                         f"{describe_kind(array)}")  # fmt: skip
    if array.ndim == 2:
        array = np.repeat(array[:, :, None], 3, axis=2)
    _check_size(array.shape[0], array.shape[1], array)
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))


def _from_tensor(tensor: torch.Tensor) -> torch.Tensor:
    if tensor.ndim != 3 or tensor.shape[0] != 3:
        raise ValueError(f"expected a torch (3, H, W) tensor, got a {describe_kind(tensor)}")
    _check_size(tensor.shape[1], tensor.shape[2], tensor)
    tensor = tensor.detach().cpu()
    if tensor.dtype == torch.uint8:
        return tensor.contiguous()
    if not tensor.is_floating_point():
        raise ValueError(f"expected a uint8 or floating-point tensor, got a {describe_kind(tensor)}")
    low, high = float(tensor.min()), float(tensor.max())
    if not (0.0 <= low and high <= 1.0):  # also refuses NaN
        raise ValueError(f"a floating-point image tensor must hold values in [0, 1] (got "
                         f"{low:g} to {high:g}); give uint8 for 0-255 pixels")  # fmt: skip
    return (tensor.float() * 255).round().to(torch.uint8).contiguous()


def _check_size(height: int, width: int, image: Any) -> None:
    if height < 1 or width < 1:
        raise ValueError(f"expected a non-empty image, got a {describe_kind(image)}")
    check_pixels(int(width), int(height), IN_MEMORY)
