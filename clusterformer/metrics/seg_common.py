"""Shared plumbing of the segmentation metrics: ground-truth records, resizing, ranks, writing.

Ground truth for scoring prediction FILES is read from the dataset's own records (the shard's
``<key>.json`` and ``<key>.label.png`` members, or a raw folder's reader) at the original
resolution, without decoding images or going through the eval transform, so scores are exact.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

# The process umask, read once (os.umask can only be read by setting it): written predictions
# get the permissions any other file the user writes gets, as engine.files gives its own.
_UMASK = os.umask(0o022)
os.umask(_UMASK)


def predictions_path_for(metrics_path: str | os.PathLike, suffix: str) -> Path:
    """Where a task's predictions for ``NAME.json`` go: ``NAME<suffix>`` (its spec's
    ``prediction_suffix``, e.g. ``.segm.json``, or a PNG folder such as ``.semantic``)."""
    path = Path(metrics_path)
    return path.with_name(path.name.removesuffix(".json") + suffix)


def _open_source(data: str | os.PathLike, task: str) -> Any:
    from clusterformer.data.sample_spec import sample_spec
    from clusterformer.data.streams import RawSource, shard_source, url_list

    formats = sample_spec(task).formats
    has_index = url_list(data) is not None or (Path(data) / "dataset.json").is_file()
    source = shard_source(data, None) if has_index else RawSource(str(data), formats)
    fmt = source.info.get("format")
    if fmt not in formats:
        raise ValueError(f"{data}: a {fmt} dataset cannot score {task} predictions "
                         f"(needs {' or '.join(formats)})")  # fmt: skip
    return source


def iter_label_records(
    data: str | os.PathLike, task: str
) -> tuple[dict, Iterator[tuple[dict, bytes | None]]]:
    """``(info, records)``: the dataset info and, per sample in dataset order, its annotation
    dict (``key``, ``image_id``, ``height``, ``width``, ``file_name``, format fields) and its
    label PNG bytes (``None`` for COCO). Images are not decoded for shards."""
    from clusterformer.data.records import LABEL_SUFFIX, encode_record

    source = _open_source(data, task)

    def records() -> Iterator[tuple[dict, bytes | None]]:
        for unit in range(len(source.counts)):
            for _, members in source.read(unit, lambda _pos: True):
                if "__entry__" in members:  # raw folder: the reader loads the record
                    members = encode_record(members["__entry__"].load())
                where = f"{members.get('__url__', data)} (sample {members.get('__key__')})"
                try:
                    annotation = json.loads(bytes(members["json"]).decode("utf-8"))
                except (ValueError, RecursionError) as exc:  # JSON, UTF-8, nesting
                    raise ValueError(f"{where}: unreadable annotation JSON "
                                     f"({type(exc).__name__})") from None  # fmt: skip
                if not isinstance(annotation, dict):
                    raise ValueError(f"{where}: the annotation JSON is not an object")
                annotation.setdefault("key", str(members.get("__key__", "")))
                label = members.get(LABEL_SUFFIX)
                yield annotation, (bytes(label) if label is not None else None)

    return source.info, records()


def prediction_file(folder: Path, key: object) -> Path:
    """``folder/<key>.png``, the prediction file of the sample ``key``; UnsafeNameError
    (ValueError) when the key is no name inside ``folder`` (``../x``, ``/abs/x``; see
    :mod:`clusterformer.data.paths`)."""
    from clusterformer.data.paths import check_name, join_inside

    name = check_name(str(key), "sample key")
    return join_inside(folder, f"{name}.png", "sample key")


def stem_of(annotation: dict) -> str:
    """The image's file stem (prediction files are named by it)."""
    name = str(annotation.get("file_name") or annotation.get("key", ""))
    return Path(name).stem


def to_original_size(values: torch.Tensor, orig_size: tuple[int, int]) -> torch.Tensor:
    """Nearest-exact resize of (..., h, w) labels or bool masks back to ``orig_size`` (H, W).

    The eval transform only resized (no crop), so this undoes it up to sampling; returns the
    input unchanged when the size already matches.
    """
    size = tuple(int(v) for v in orig_size)
    if tuple(values.shape[-2:]) == size:
        return values
    lead = values.shape[:-2]
    flat = values.reshape(1, -1, *values.shape[-2:]).to(torch.float32)
    if flat.shape[1] == 0:
        return values.new_zeros((*lead, *size))
    out = F.interpolate(flat, size=size, mode="nearest-exact")[0]
    return out.round().to(values.dtype).reshape(*lead, *size)


def as_numpy(value: Any) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    return np.asarray(value)


def distributed() -> bool:
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def gather_lists(items: list) -> list:
    """Concatenate a list from every rank (rank order); the list itself when not distributed."""
    if not distributed():
        return list(items)
    parts: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(parts, items)
    return [x for part in parts for x in part]


def broadcast_from_rank0(value: Any) -> Any:
    if not distributed():
        return value
    box = [value]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def real_images(predictions: Any, batch: dict) -> Iterator[tuple[int, Any, dict]]:
    """``(index in the batch, prediction, target)`` of each image of a batch, without those whose
    ``batch["valid"]`` flag is False (the loader's distributed padding): every image counts
    exactly once over all ranks."""
    valid = batch.get("valid")
    for i, (pred, target) in enumerate(zip(predictions, batch["targets"], strict=True)):
        if valid is None or bool(valid[i]):
            yield i, pred, target


def is_rank0() -> bool:
    return not distributed() or torch.distributed.get_rank() == 0


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write via a temporary name + rename, so a half-written file never looks whole."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600: give the file normal permissions
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    except OSError as exc:  # a full disk: name the file (a bare write() error names none)
        Path(tmp).unlink(missing_ok=True)
        raise OSError(exc.errno, exc.strerror, str(path)) from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_json_file(path: Path, what: str) -> Any:
    """JSON content of ``path``; FileNotFoundError / ValueError naming the file otherwise."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: {what} not found")
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError:
        raise ValueError(f"{path}: {what} is not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON (line {exc.lineno}: {exc.msg})") from None
    except RecursionError:
        raise ValueError(f"{path}: {what} is JSON nested too deeply to be read") from None
