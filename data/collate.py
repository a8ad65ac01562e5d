"""Collation of transformed samples into a batch dict (padding + pixel mask).

Batch layout (shared with the engine)::

    "images":     float32 (B, 3, H, W)  normalised, zero-padded to the batch's max H, W
    "pixel_mask": bool (B, H, W)        True = real pixel, False = padding
    "keys":       list[str]
    "valid":      bool (B,)             False only for evaluation padding (see data/loader.py)
    "labels":     int64 (B,)            tasks with a per-image label (SampleSpec.label_field)
    "targets":    list[dict]            the others: the task's fields + "image_id", "orig_size",
                                        "size", "key"
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .sample_spec import SampleSpec, sample_spec
from .transforms import IGNORE_INDEX


def task_fields(task: str | SampleSpec) -> tuple[str, ...]:
    """Names of the per-sample fields that ``task`` needs (raises on an unknown task)."""
    return sample_spec(task).fields


def pad_images(images: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """List of (3, h_i, w_i) float -> (B, 3, H, W) zero-padded bottom/right, and (B, H, W) bool mask."""
    if not images:
        raise ValueError("cannot collate an empty batch")
    height = max(int(im.shape[-2]) for im in images)
    width = max(int(im.shape[-1]) for im in images)
    batch = images[0].new_zeros((len(images), images[0].shape[0], height, width))
    mask = torch.zeros((len(images), height, width), dtype=torch.bool)
    for i, im in enumerate(images):
        h, w = im.shape[-2:]
        batch[i, :, :h, :w] = im
        mask[i, :h, :w] = True
    return batch, mask


def pad_semantic(maps: Sequence[torch.Tensor], size: tuple[int, int] | None = None) -> torch.Tensor:
    """List of (h_i, w_i) int64 maps -> (B, H, W) int64 padded with 255 (ignore).

    ``size`` defaults to the largest map; pass the batch's image size to line up with "images".
    """
    if size is None:
        size = (max(int(m.shape[0]) for m in maps), max(int(m.shape[1]) for m in maps))
    out = torch.full((len(maps), *size), IGNORE_INDEX, dtype=torch.int64)
    for i, m in enumerate(maps):
        out[i, : m.shape[0], : m.shape[1]] = m
    return out


def collate(
    samples: Sequence[dict[str, Any]], task: str | SampleSpec, valid: Sequence[bool] | None = None
) -> dict:
    """Transformed samples -> batch dict (layout in the module docstring).

    ``valid`` marks samples that only pad an evaluation step (False); default all True.
    """
    spec = sample_spec(task)
    fields = spec.fields
    images, pixel_mask = pad_images([s["image"] for s in samples])
    batch: dict[str, Any] = {
        "images": images,
        "pixel_mask": pixel_mask,
        "keys": [str(s["key"]) for s in samples],
        "valid": torch.tensor(
            [True] * len(samples) if valid is None else list(valid), dtype=torch.bool
        ),
    }
    if spec.label_field is not None:
        labels = [int(s[spec.label_field]) for s in samples]
        batch["labels"] = torch.tensor(labels, dtype=torch.int64)
        return batch
    targets = []
    for s in samples:
        missing = [f for f in fields if f not in s]
        if missing:
            raise ValueError(
                f"sample {s.get('key')!r} lacks {', '.join(missing)} needed by its task"
            )
        target = {f: s[f] for f in fields}
        target["image_id"] = int(s["image_id"])
        target["orig_size"] = tuple(int(v) for v in s["orig_size"])
        target["size"] = tuple(int(v) for v in s["size"])
        target["key"] = str(s["key"])
        targets.append(target)
    batch["targets"] = targets
    return batch
