"""``cf shard-dataset --val-fraction F --seed S``: one raw source -> a train and a val shard
folder, split deterministically by seed, the split recorded in each folder's dataset.json.

The split is by sample: entries are sorted by key, shuffled with ``random.Random`` seeded from
``S`` and the first ``round(F * N)`` (at least one and at most ``N - 1``) go to val. Every
entry lands in exactly one folder with its original bytes; each folder is written by
:func:`~clusterformer.data.shards.write_shards` (temporaries, dataset.json last).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

from clusterformer.data.shards import write_shards
from clusterformer.data.source import Entry, Source

SPLITS = ("train", "val")


def split_entries(entries: list[Entry], val_fraction: float, seed: int) -> tuple[list[Entry], list[Entry]]:
    """``(train, val)`` entries, each in key order; the same arguments give the same split."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"--val-fraction must be between 0 and 1 (exclusive), got {val_fraction}")
    if len(entries) < 2:
        raise ValueError(f"{len(entries)} sample(s) cannot be split into train and val")
    order = sorted(entries, key=lambda e: e.key)
    random.Random(f"split-{seed}").shuffle(order)
    n_val = min(max(round(val_fraction * len(order)), 1), len(order) - 1)
    by_key = lambda e: e.key  # noqa: E731
    return sorted(order[n_val:], key=by_key), sorted(order[:n_val], key=by_key)


def write_split_shards(
    source: Source, out: str | Path, *, val_fraction: float, seed: int, origin: str,
    progress: Callable[[int], None] | None = None, **options: Any,
) -> dict[str, dict]:  # fmt: skip
    """Write ``out/train`` and ``out/val`` (see the module docstring); returns their
    dataset.json dicts by split name. ``origin`` names the source in the record; ``options``
    go to :func:`write_shards` (its ``seed`` is this split's seed too). The record's
    ``counts`` are the entries assigned to each split; with ``on_error="skip"`` a folder's
    ``num_samples`` can be lower (its ``skipped`` says by how many)."""
    train, val = split_entries(source.entries, val_fraction, seed)
    counts = {"train": len(train), "val": len(val)}
    infos: dict[str, dict] = {}
    done = 0
    for name, entries in zip(SPLITS, (train, val), strict=True):
        record = {"name": name, "val_fraction": float(val_fraction), "seed": int(seed),
                  "counts": counts, "source": origin}  # fmt: skip
        part = Source({**source.info, "split": record}, entries)
        offset = done
        tick = None if progress is None else (lambda n, offset=offset: progress(offset + n))
        infos[name] = write_shards(part, Path(out) / name, seed=seed, progress=tick, **options)
        done += len(entries)
    return infos
