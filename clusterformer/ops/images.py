"""Image normalisation as a pure function, and the ImageNet statistics most backbones expect.

A model's mean/std travel with it (``model.default_cfg``, then the checkpoint's
``normalisation``); :data:`IMAGENET_MEAN` / :data:`IMAGENET_STD` are only the value a model
without its own statistics starts from.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)


def normalize_image(
    image: Tensor, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD
) -> Tensor:
    """``(..., 3, H, W)`` uint8 (or float in ``[0, 255]``) -> float32 ``(x / 255 - mean) / std``."""
    mean_t = torch.tensor(tuple(mean), dtype=torch.float32).view(3, 1, 1)
    std_t = torch.tensor(tuple(std), dtype=torch.float32).view(3, 1, 1)
    return (image.to(torch.float32) / 255.0 - mean_t) / std_t
