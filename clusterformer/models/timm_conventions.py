"""timm's model conventions, written out so that the backbone speaks them without importing timm
(an optional extra): the pretrained cfg's names and the stage selection of
``forward_intermediates`` / ``prune_intermediate_layers``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from clusterformer.ops.images import IMAGENET_MEAN, IMAGENET_STD


def default_cfg(in_chans: int = 3, num_classes: int = 1000) -> dict[str, Any]:
    """The model's preprocessing and layout under the names of timm's pretrained cfg: ImageNet
    mean/std, 224 px crops (crop 0.875, bicubic), the stage-4 map of a 224 px image
    (``pool_size``), and the names of its first conv and of its classifier."""
    return {
        "mean": IMAGENET_MEAN, "std": IMAGENET_STD, "input_size": (in_chans, 224, 224),
        "pool_size": (7, 7), "crop_pct": 0.875, "interpolation": "bicubic",
        "first_conv": "stem", "classifier": "head", "num_classes": num_classes,
    }


def feature_take_indices(count: int, indices: int | Sequence[int] | None) -> tuple[list[int], int]:
    """timm's stage selection: ``None`` all ``count`` stages, an int ``n`` the last ``n``, a
    sequence those stages (negative ones from the end). Returns them and the largest one.

    Raises:
        ValueError: a stage that does not exist.
    """
    if indices is None:
        indices = count
    if isinstance(indices, int):
        if not 0 < indices <= count:
            raise ValueError(f"cannot take the last {indices} of {count} stages")
        take = list(range(count - indices, count))
    else:
        take = [count + int(i) if int(i) < 0 else int(i) for i in indices]
        if not take or any(not 0 <= i < count for i in take):
            raise ValueError(f"stage indices {list(indices)} out of range for {count} stages")
    return take, max(take)
