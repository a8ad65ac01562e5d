"""ImageFolder reader (``--format imagefolder``): ``root/<class>/**/<image>``, folder = label.

Classes are the sub-folders in sorted order (train id = position); loose files at the top
(README, ATTRIBUTION.txt) and non-image files are not samples.
"""

from __future__ import annotations

from pathlib import Path

from clusterformer.data.errors import DatasetError
from clusterformer.data.records import Record
from clusterformer.data.source import (
    Entry,
    Source,
    is_image_file,
    read_image,
    require_dir,
    unique_keys,
)


def _load(path: Path, root: Path, key: str, index: int, label: int, name: str) -> Record:
    data, ext, height, width = read_image(path, key)
    annotation = {
        "format": "imagefolder",
        "file_name": path.relative_to(root).as_posix(),
        "image_id": index,
        "height": height,
        "width": width,
        "label": label,
        "class": name,
    }
    return Record(key, ext, data, annotation, path=str(path))


def read_imagefolder(images: str | Path) -> Source:
    """``images/<class>/...`` -> Source with categories {id = train_id, name = folder}."""
    root = require_dir(Path(images), "images")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DatasetError(root, "no class folders found (expected images/<class>/<image>)")
    items = []
    for label, name in enumerate(classes):
        files = sorted(p for p in (root / name).rglob("*") if is_image_file(p)
                       and not any(part.startswith(".") for part in p.relative_to(root).parts))  # fmt: skip
        items.extend((path, label, name) for path in files)
    if not items:
        raise DatasetError(root, "no image files found in the class folders")
    keys = unique_keys([path.relative_to(root).with_suffix("").as_posix() for path, _, _ in items])
    entries = [
        Entry(key, str(path), lambda path=path, key=key, i=i, label=label, name=name: _load(
            path, root, key, i, label, name))  # fmt: skip
        for i, (key, (path, label, name)) in enumerate(zip(keys, items, strict=True))
    ]
    categories = [{"id": i, "name": n, "isthing": True, "train_id": i} for i, n in enumerate(classes)]
    info = {"format": "imagefolder", "categories": categories, "source": {"images": str(root)}}
    return Source(info, entries)
