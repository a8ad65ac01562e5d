"""What every raw-format reader returns: a ``Source`` of lazily loaded, individually failing entries.

Readers validate files up front only where the whole input is unusable (``DatasetError``); every
per-sample problem is raised by ``Entry.load()`` as a ``SampleError`` naming the key and path, so
the caller decides whether to stop or to skip, count and list.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from clusterformer.data.errors import DatasetError, ImageDecodeError, SampleError
from clusterformer.data.images import IMAGE_EXTENSIONS, decode_image_array, image_format_extension
from clusterformer.data.paths import name_problem
from clusterformer.data.records import Record, decode_record, encode_record

ON_ERROR = ("stop", "skip")


@dataclass(frozen=True)
class Entry:
    """One sample before reading: its key, its image path and how to load it."""

    key: str
    path: str
    load: Callable[[], Record]


@dataclass
class Source:
    """A raw dataset: ``info`` (format, categories, source paths, ...) and its entries."""

    info: dict
    entries: list[Entry] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.entries)

    def records(self, on_error: str = "stop", skipped: list | None = None) -> Iterator[Record]:
        """Load every entry; with "skip" bad ones are appended to ``skipped`` (SampleError)."""
        return iter_records(self.entries, on_error, skipped)

    def samples(self, on_error: str = "stop", skipped: list | None = None) -> Iterator[dict]:
        """Decoded samples (data_interface.md) straight from raw files, no shards needed."""
        for record in self.records(on_error, skipped):
            yield decode_record(encode_record(record), self.info)


def iter_records(entries: list[Entry], on_error: str, skipped: list | None) -> Iterator[Record]:
    if on_error not in ON_ERROR:
        raise ValueError(f"--on-error must be one of {', '.join(ON_ERROR)}, got {on_error!r}")
    for entry in entries:
        try:
            yield entry.load()
        except SampleError as exc:
            if on_error == "stop":
                raise
            if skipped is not None:
                skipped.append(exc)


_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")


def safe_key(text: str) -> str:
    """A webdataset-safe key: letters, digits, ``_`` and ``-`` only (no dots, no slashes)."""
    return _UNSAFE.sub("_", text).strip("_") or "sample"


def unique_keys(names: list[str]) -> list[str]:
    """``safe_key`` of each name, with ``_2``, ``_3``, ... appended to repeats (stable order)."""
    seen: dict[str, int] = {}
    out = []
    for name in names:
        key = safe_key(name)
        if key in seen:
            seen[key] += 1
            candidate = f"{key}_{seen[key]}"
            while candidate in seen:
                seen[key] += 1
                candidate = f"{key}_{seen[key]}"
            key = candidate
        seen.setdefault(key, 1)
        out.append(key)
    return out


def read_json(path: Path, what: str) -> object:
    """Load a JSON file, turning every failure into a DatasetError naming the file."""
    if not path.is_file():
        raise DatasetError(path, f"{what} not found")
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError:
        raise DatasetError(path, f"{what} is not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        raise DatasetError(path, f"invalid JSON in {what} (line {exc.lineno}: {exc.msg})") from None
    except RecursionError:
        raise DatasetError(path, f"{what} is JSON nested too deeply to be read") from None


def as_int(value: object) -> int | None:
    """An integer id from JSON (an int, or a float or string holding one), else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return int(value)
    if isinstance(value, str) and re.fullmatch(r"\s*-?\d+\s*", value):
        return int(value)
    return None


def non_finite_path(value: object, where: str = "") -> str | None:
    """Where in JSON ``value`` a NaN or infinite number sits (e.g. ``bbox[2] is nan``), else
    None.

    Python's json module accepts ``NaN`` and ``Infinity``; they are not JSON and poison every
    box, area or polygon they reach, so readers reject them per sample.
    """
    if isinstance(value, float):
        return None if math.isfinite(value) else f"{where or 'value'} is {value}"
    if isinstance(value, dict):
        for key, item in value.items():
            found = non_finite_path(item, f"{where}.{key}" if where else str(key))
            if found:
                return found
    elif isinstance(value, list):
        for i, item in enumerate(value):
            found = non_finite_path(item, f"{where}[{i}]")
            if found:
                return found
    return None


def image_problems(images: list[dict]) -> dict[int, str]:
    """Per index of a COCO ``images`` list, why that entry cannot be a sample: no integer id,
    an id used by another entry (whose annotations would be mixed up), NaN in its fields."""
    problems: dict[int, str] = {}
    by_id: dict[int, list[int]] = {}
    for i, image in enumerate(images):
        image_id = as_int(image.get("id"))
        bad = non_finite_path(image)
        if "id" not in image:
            problems[i] = "image entry has no id"
        elif not isinstance(image.get("file_name"), str) or not image["file_name"]:
            problems[i] = "image entry has no file_name"
        elif name_problem(image["file_name"]):  # "../../x" would read outside --images
            problems[i] = f"file_name {image['file_name'][:80]!r} {name_problem(image['file_name'])}"
        elif image_id is None:
            problems[i] = f"image id {str(image.get('id'))[:40]!r} is not an integer"
        elif bad:
            problems[i] = f"image entry: {bad}, not a number"
        else:
            by_id.setdefault(image_id, []).append(i)
    for image_id, indices in by_id.items():
        if len(indices) > 1:
            names = ", ".join(str(images[j].get("file_name", "?"))[:40] for j in indices[:3])
            for j in indices:
                problems[j] = (f"image id {image_id} is used by {len(indices)} images ({names}); "
                               "ids must be unique")  # fmt: skip
    return problems


def sort_key(image: dict) -> tuple:
    """Images in id order; entries without a usable id last, by file name."""
    image_id = as_int(image.get("id"))
    return (image_id is None, image_id or 0, str(image.get("file_name", "")))


def image_stem(image: dict, index: int) -> str:
    name = image.get("file_name") or image.get("id") or f"image-{index}"
    return Path(str(name)).stem


def require_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise DatasetError(path, f"{what} folder not found")
    return path


def is_image_file(path: Path) -> bool:
    return path.is_file() and path.suffix.lower().lstrip(".") in IMAGE_EXTENSIONS


def read_image(path: Path, key: str) -> tuple[bytes, str, int, int]:
    """Read and fully decode an image file (catching truncation): (bytes, ext, height, width).

    Height and width are after EXIF orientation, which is what annotations refer to.
    """
    if not path.is_file():
        raise SampleError(path, key, "image file not found")
    data = path.read_bytes()
    try:
        array = decode_image_array(data, str(path))
    except ImageDecodeError as exc:
        raise SampleError(path, key, exc.reason) from None
    ext = path.suffix.lower().lstrip(".")
    if ext not in IMAGE_EXTENSIONS:
        ext = image_format_extension(data) or "img"
    ext = {"jpeg": "jpg", "tiff": "tif"}.get(ext, ext)
    return data, ext, int(array.shape[0]), int(array.shape[1])


def read_label_png(
    path: Path, key: str, decode: Callable[[bytes, str], object], what: str, size: tuple[int, int]
) -> tuple[bytes, object]:
    """Read and decode a label PNG that must match its image: (bytes, decoded ``(H, W)`` array).

    ``what`` names the file in errors ("label map", "panoptic PNG"); ``size`` is the image's
    ``(height, width)``.
    """
    if not path.is_file():
        raise SampleError(path, key, f"{what} not found")
    data = path.read_bytes()
    try:
        values = decode(data, str(path))
    except ImageDecodeError as exc:
        raise SampleError(path, key, exc.reason) from None
    if values.shape != size:
        raise SampleError(path, key, f"{what} is {values.shape[1]}x{values.shape[0]}, the image "
                          f"is {size[1]}x{size[0]}")  # fmt: skip
    return data, values
