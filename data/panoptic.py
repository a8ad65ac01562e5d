"""COCO panoptic reader (``--format coco-panoptic``): JSON segments_info + id PNGs.

Each sample is checked the way panopticapi does: the PNG's non-zero ids equal the JSON's
segment ids, every segment's area equals its pixel count, and PNG and image sizes agree.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from clusterformer.data.categories import contiguous_categories
from clusterformer.data.errors import DatasetError, ImageDecodeError, SampleError
from clusterformer.data.images import decode_panoptic_png
from clusterformer.data.records import Record
from clusterformer.data.source import Entry, Source, read_image, read_json, require_dir, unique_keys


def _ids_text(ids: set[int]) -> str:
    shown = sorted(ids)[:6]
    return "{" + ", ".join(map(str, shown)) + (", ..." if len(ids) > 6 else "") + "}"


def _check_segments(png: Path, key: str, ids: np.ndarray, segments: list, known: set) -> None:
    values, counts = np.unique(ids, return_counts=True)
    in_png = {int(v): int(c) for v, c in zip(values, counts, strict=True) if v != 0}
    in_json = {}
    for seg in segments:
        if int(seg.get("category_id", -1)) not in known:
            raise SampleError(png, key, f"segment {seg.get('id')}: unknown category id "
                              f"{seg.get('category_id')}")  # fmt: skip
        in_json[int(seg["id"])] = seg
    if len(in_json) != len(segments):
        raise SampleError(png, key, "segments_info lists the same segment id twice")
    if set(in_png) != set(in_json):
        only_png, only_json = set(in_png) - set(in_json), set(in_json) - set(in_png)
        raise SampleError(png, key, f"panoptic PNG ids do not match segments_info: only in the PNG "
                          f"{_ids_text(only_png)}, only in the JSON {_ids_text(only_json)}")  # fmt: skip
    for seg_id, seg in in_json.items():
        if "area" in seg and int(seg["area"]) != in_png[seg_id]:
            raise SampleError(png, key, f"segment {seg_id}: area {seg['area']} in the JSON, "
                              f"{in_png[seg_id]} pixels in the PNG")  # fmt: skip


def _load(images_dir: Path, masks_dir: Path, image: dict, ann: dict | None, known: set,
          key: str) -> Record:  # fmt: skip
    path = images_dir / str(image.get("file_name", ""))
    data, ext, height, width = read_image(path, key)
    if ann is None:
        raise SampleError(path, key, "image has no entry in the panoptic annotations")
    png = masks_dir / str(ann.get("file_name", Path(path).with_suffix(".png").name))
    if not png.is_file():
        raise SampleError(png, key, "panoptic PNG not found")
    label_bytes = png.read_bytes()
    try:
        ids = decode_panoptic_png(label_bytes, str(png))
    except ImageDecodeError as exc:
        raise SampleError(png, key, exc.reason) from None
    if ids.shape != (height, width):
        raise SampleError(png, key, f"panoptic PNG is {ids.shape[1]}x{ids.shape[0]}, the image is "
                          f"{width}x{height}")  # fmt: skip
    segments = list(ann.get("segments_info", []))
    _check_segments(png, key, ids, segments, known)
    annotation = {
        "format": "coco-panoptic",
        "file_name": str(image["file_name"]),
        "label_file": png.name,
        "image_id": int(image["id"]),
        "height": height,
        "width": width,
        "segments_info": segments,
    }
    return Record(key, ext, data, annotation, label_png=label_bytes, path=str(path))


def read_panoptic(images: str | Path, annotations: str | Path, masks: str | Path) -> Source:
    """COCO panoptic JSON + image folder + PNG folder -> Source (one entry per image)."""
    images_dir = require_dir(Path(images), "images")
    masks_dir = require_dir(Path(masks), "panoptic PNG (--masks)")
    ann_path = Path(annotations)
    coco = read_json(ann_path, "annotations file")
    if not isinstance(coco, dict) or not isinstance(coco.get("annotations"), list):
        raise DatasetError(ann_path, 'not a COCO panoptic file (no "annotations" list)')
    if not isinstance(coco.get("categories"), list) or not coco["categories"]:
        raise DatasetError(ann_path, 'not a COCO panoptic file (no "categories" list)')
    try:
        categories = contiguous_categories(coco["categories"], default_isthing=True)
        by_image = {int(a["image_id"]): a for a in coco["annotations"]}
    except (KeyError, ValueError, TypeError) as exc:
        raise DatasetError(ann_path, f"bad categories or annotations ({exc})") from None
    image_list = coco.get("images")
    if not isinstance(image_list, list):
        # Some exports carry only annotations: derive the image names from the PNG names.
        image_list = [{"id": a["image_id"], "file_name": Path(a["file_name"]).stem + ".jpg"}
                      for a in coco["annotations"]]  # fmt: skip
    image_list = sorted(image_list, key=lambda im: int(im["id"]))
    orphans = set(by_image) - {int(im["id"]) for im in image_list}
    if orphans:
        raise DatasetError(ann_path, f"annotations refer to unknown image ids {sorted(orphans)[:5]}")
    keys = unique_keys([Path(str(im.get("file_name", im["id"]))).stem for im in image_list])
    known = {c["id"] for c in categories}
    entries = [
        Entry(
            key,
            str(images_dir / str(im.get("file_name", ""))),
            lambda im=im, key=key: _load(
                images_dir, masks_dir, im, by_image.get(int(im["id"])), known, key
            ),
        )
        for key, im in zip(keys, image_list, strict=True)
    ]
    info = {
        "format": "coco-panoptic",
        "categories": categories,
        "source": {"images": str(images_dir), "annotations": str(ann_path), "masks": str(masks_dir)},
    }
    return Source(info, entries)
