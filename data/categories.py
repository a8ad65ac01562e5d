"""Category bookkeeping: dataset ids (COCO's 1..90 with gaps, ADE's 1..150) <-> train ids 0..C-1.

A category is ``{"id": <original id>, "name": str, "isthing": bool, "train_id": int}``; lists are
kept in train-id order, which is ascending original id.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

IGNORE_INDEX = 255


def contiguous_categories(raw: Iterable[dict], default_isthing: bool = True) -> list[dict]:
    """Sort categories by original id and number them 0..C-1 (``train_id``).

    ``raw`` holds dicts with at least "id" and "name" (COCO / classes.json style); "isthing"
    defaults to ``default_isthing`` when absent or null. Raises ValueError on duplicate ids.
    """
    items = sorted(raw, key=lambda c: int(c["id"]))
    ids = [int(c["id"]) for c in items]
    if len(set(ids)) != len(ids):
        duplicates = sorted({i for i in ids if ids.count(i) > 1})
        raise ValueError(f"duplicate category ids {duplicates}")
    out = []
    for train_id, cat in enumerate(items):
        isthing = cat.get("isthing")
        out.append(
            {
                "id": int(cat["id"]),
                "name": str(cat.get("name", cat["id"])),
                "isthing": bool(default_isthing if isthing is None else isthing),
                "train_id": train_id,
            }
        )
    return out


def id_to_train_id(categories: Sequence[dict]) -> dict[int, int]:
    """{original category id: train id}."""
    return {int(c["id"]): int(c["train_id"]) for c in categories}


def train_id_to_id(categories: Sequence[dict]) -> list[int]:
    """List indexed by train id giving the original category id (for writing COCO results)."""
    ordered = sorted(categories, key=lambda c: int(c["train_id"]))
    return [int(c["id"]) for c in ordered]


def to_dataset_ids(train_ids: Iterable[int], categories: Sequence[dict]) -> list[int]:
    """Map predicted train ids back to the dataset's own category ids (COCO results JSON)."""
    table = train_id_to_id(categories)
    return [table[int(t)] for t in train_ids]


def semantic_lut(categories: Sequence[dict], max_value: int = 65535) -> np.ndarray:
    """Lookup table from raw label-map values to train ids, ``IGNORE_INDEX`` for the rest.

    Returns int64 (max_value + 1,). With ADE20K's ids 1..150 this is the usual 0 -> 255,
    k -> k - 1 mapping.
    """
    lut = np.full(max_value + 1, IGNORE_INDEX, dtype=np.int64)
    for cat in categories:
        if 0 <= int(cat["id"]) <= max_value:
            lut[int(cat["id"])] = int(cat["train_id"])
    return lut
