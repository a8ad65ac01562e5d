"""ADE20K-style semantic reader (``--format ade20k``): images + single-channel class PNGs.

Layout: ``images/<stem>.jpg``, ``<masks>/<stem>.png`` (raw class values, 0 = "other"/ignore) and
a ``classes.json`` ({"ignore_index": 0, "classes": [{id, name, isthing}, ...]}) given with
``--annotations`` or found beside the masks. Train ids: class k -> k - 1, ignore -> 255.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from clusterformer.data.categories import IGNORE_INDEX, contiguous_categories
from clusterformer.data.errors import DatasetError, SampleError
from clusterformer.data.images import decode_label_map
from clusterformer.data.records import Record
from clusterformer.data.source import (
    Entry,
    Source,
    as_int,
    is_image_file,
    non_finite_path,
    read_image,
    read_json,
    read_label_png,
    require_dir,
    unique_keys,
)


def find_classes_json(images_dir: Path, masks_dir: Path) -> Path | None:
    """classes.json in the masks folder, its parent, or the images folder's parent."""
    for folder in (masks_dir, masks_dir.parent, images_dir.parent):
        if (folder / "classes.json").is_file():
            return folder / "classes.json"
    return None


def _read_classes(path: Path) -> tuple[list[dict], int]:
    spec = read_json(path, "classes file")
    if not isinstance(spec, dict) or not isinstance(spec.get("classes"), list):
        raise DatasetError(path, 'not a classes file (expected {"classes": [{"id", "name"}, ...]})')
    ignore = as_int(spec.get("ignore_index", 0))
    if ignore is None:
        raise DatasetError(path, f"ignore_index {str(spec.get('ignore_index'))[:40]!r} is not an "
                           "integer; fix the classes file")  # fmt: skip
    bad = non_finite_path(spec["classes"], "classes")
    if bad:
        raise DatasetError(path, f"{bad}, not a number; fix the classes file")
    try:
        classes = [c for c in spec["classes"] if int(c["id"]) != ignore]
        categories = contiguous_categories(classes, default_isthing=False)
    except (KeyError, ValueError, TypeError) as exc:
        raise DatasetError(path, f"bad classes ({exc})") from None
    if not categories:
        raise DatasetError(path, "no classes besides the ignore value")
    return categories, ignore


def _load(image: Path, label: Path, key: str, index: int, allowed: np.ndarray, root: Path) -> Record:
    data, ext, height, width = read_image(image, key)
    label_bytes, values = read_label_png(label, key, decode_label_map, "label map", (height, width))
    present = np.unique(values)
    in_range = present[(present >= 0) & (present < allowed.size)]
    unknown = sorted(set(present.tolist()) - set(in_range[allowed[in_range]].tolist()))
    if unknown:
        raise SampleError(label, key, f"label values {unknown[:6]} are not in "
                          "classes.json")  # fmt: skip
    annotation = {
        "format": "ade20k",
        "file_name": image.relative_to(root).as_posix(),
        "label_file": label.name,
        "image_id": index,
        "height": height,
        "width": width,
    }
    return Record(key, ext, data, annotation, label_png=label_bytes, path=str(image))


def read_ade20k(
    images: str | Path, masks: str | Path, classes: str | Path | None = None
) -> Source:
    """Image folder + label-PNG folder (+ classes.json) -> Source, matched by file stem."""
    images_dir = require_dir(Path(images), "images")
    masks_dir = require_dir(Path(masks), "label PNG (--masks)")
    classes_path = Path(classes) if classes else find_classes_json(images_dir, masks_dir)
    if classes_path is None:
        raise DatasetError(masks_dir, "no classes.json found beside the masks; pass it with "
                           "--annotations")  # fmt: skip
    categories, ignore = _read_classes(classes_path)
    allowed = np.zeros(max(max(c["id"] for c in categories), ignore) + 1, dtype=bool)
    allowed[[c["id"] for c in categories]] = True
    allowed[ignore] = True
    files = sorted(p for p in images_dir.iterdir() if is_image_file(p))
    if not files:
        raise DatasetError(images_dir, "no image files found")
    keys = unique_keys([p.stem for p in files])
    entries = [
        Entry(key, str(path), lambda path=path, key=key, i=i: _load(
            path, masks_dir / f"{path.stem}.png", key, i, allowed, images_dir))  # fmt: skip
        for i, (key, path) in enumerate(zip(keys, files, strict=True))
    ]
    info = {
        "format": "ade20k",
        "categories": categories,
        "ignore_index": IGNORE_INDEX,
        "label_ignore_value": ignore,
        "source": {"images": str(images_dir), "masks": str(masks_dir), "classes": str(classes_path)},
    }
    return Source(info, entries)
