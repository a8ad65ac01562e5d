"""Scoring a saved classification prediction file (``cf eval --predictions``) without a model.

The file is a JSON object of image key -> class id (the dataset's own id), class name, or a
list of them best first; it is scored with top-k accuracy against the dataset's labels.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from clusterformer.metrics.seg_common import read_json_file
from clusterformer.metrics.topk import TopKAccumulator


def _ranked_ids(value: Any, key: str, to_train: dict[int, int], by_name: dict[str, int],
                path: Path) -> list[int]:  # fmt: skip
    items = value if isinstance(value, list) else [value]
    out = []
    for item in items:
        if isinstance(item, bool) or not isinstance(item, int | str):
            raise ValueError(
                f"{path}: prediction for '{key}' must be a class id, a class name or a list of them"
            )
        if isinstance(item, str):
            if item not in by_name:
                raise ValueError(f"{path}: prediction for '{key}' names unknown class '{item}'")
            out.append(by_name[item])
        elif item in to_train:
            out.append(to_train[item])
        else:
            raise ValueError(f"{path}: prediction for '{key}' has unknown class id {item}")
    if not out:
        raise ValueError(f"{path}: prediction for '{key}' is empty")
    return out


def score_class_file(predictions: str | os.PathLike, data: str | os.PathLike, *, task: str,
                     num_workers: int = 0, per_class: bool = False) -> dict[str, Any]:  # fmt: skip
    """``top1``, ``top5`` (and ``num_samples``, ``unmatched_predictions``) of a prediction file
    against ``data`` read as ``task``'s samples."""
    from clusterformer.data import LoaderSpec, build_loader, load_dataset_info

    predictions = Path(predictions)
    preds = read_json_file(predictions, "predictions file")
    if not isinstance(preds, dict):
        raise ValueError(f"{predictions}: expected a JSON object of image key -> class id")
    categories = load_dataset_info(str(data), task)["categories"]
    to_train = {int(c["id"]): int(c["train_id"]) for c in categories}
    by_name = {str(c["name"]): int(c["train_id"]) for c in categories}
    names = [str(c.get("name", c["id"])) for c in categories] if per_class else None
    acc = TopKAccumulator(num_classes=len(categories), class_names=names)
    # The labels come with the images; a tiny eval size keeps decoding cheap.
    loader = build_loader(str(data), task, LoaderSpec(batch_size=64, image_size=8, train=False,
                          num_workers=num_workers, rank=0, world_size=1))  # fmt: skip
    seen = 0
    for batch in loader:
        valid = batch.get("valid", [True] * len(batch["keys"]))
        rows, labels = [], []
        for key, label, ok in zip(batch["keys"], batch["labels"].tolist(), valid, strict=True):
            if not ok:
                continue
            if key not in preds:
                raise ValueError(f"{predictions}: no prediction for image '{key}' of {data}")
            rows.append(_ranked_ids(preds[key], key, to_train, by_name, predictions))
            labels.append(label)
        if rows:
            width = max(len(r) for r in rows)
            ranked = torch.tensor([r + [-1] * (width - len(r)) for r in rows], dtype=torch.int64)
            acc.update_ranked(ranked, torch.tensor(labels, dtype=torch.int64))
            seen += len(rows)
    metrics = acc.compute()
    extra = len(preds) - seen
    if extra > 0:
        metrics["unmatched_predictions"] = extra
    return metrics
