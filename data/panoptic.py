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
from clusterformer.data.source import (
    Entry,
    Source,
    as_int,
    image_problems,
    image_stem,
    non_finite_path,
    read_image,
    read_json,
    require_dir,
    sort_key,
    unique_keys,
)


def _ids_text(ids: set[int]) -> str:
    shown = sorted(ids)[:6]
    return "{" + ", ".join(map(str, shown)) + (", ..." if len(ids) > 6 else "") + "}"


def _check_segments(png: Path, key: str, ids: np.ndarray, segments: list, known: set) -> None:
    values, counts = np.unique(ids, return_counts=True)
    in_png = {int(v): int(c) for v, c in zip(values, counts, strict=True) if v != 0}
    in_json = {}
    for i, seg in enumerate(segments):
        if not isinstance(seg, dict) or as_int(seg.get("id")) is None:
            raise SampleError(png, key, f"segments_info[{i}] has no integer id")
        bad = non_finite_path(seg)
        if bad:
            raise SampleError(png, key, f"segment {seg.get('id')}: {bad}, not a number")
        if as_int(seg.get("category_id")) not in known:
            raise SampleError(png, key, f"segment {seg.get('id')}: unknown category id "
                              f"{seg.get('category_id')}")  # fmt: skip
        in_json[as_int(seg["id"])] = seg
    if len(in_json) != len(segments):
        raise SampleError(png, key, "segments_info lists the same segment id twice")
    if set(in_png) != set(in_json):
        only_png, only_json = set(in_png) - set(in_json), set(in_json) - set(in_png)
        raise SampleError(png, key, f"panoptic PNG ids do not match segments_info: only in the PNG "
                          f"{_ids_text(only_png)}, only in the JSON {_ids_text(only_json)}")  # fmt: skip
    for seg_id, seg in in_json.items():
        if "area" in seg and as_int(seg["area"]) != in_png[seg_id]:
            raise SampleError(png, key, f"segment {seg_id}: area {seg['area']} in the JSON, "
                              f"{in_png[seg_id]} pixels in the PNG")  # fmt: skip


def _load(images_dir: Path, masks_dir: Path, image: dict, ann: dict | None, known: set,
          key: str, problem: str | None) -> Record:  # fmt: skip
    path = images_dir / str(image.get("file_name", ""))
    if problem:  # found while indexing (no id, duplicate id, NaN, two annotation entries)
        raise SampleError(path, key, problem)
    data, ext, height, width = read_image(path, key)
    if ann is None:
        raise SampleError(path, key, "image has no entry in the panoptic annotations")
    if not isinstance(ann.get("segments_info", []), list):
        raise SampleError(path, key, "segments_info is not a list")
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
        "image_id": as_int(image["id"]),
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
    annotations = coco["annotations"]
    if not all(isinstance(a, dict) for a in annotations):
        raise DatasetError(ann_path, '"annotations" is not a list of objects')
    if annotations and all("bbox" in a and "segments_info" not in a for a in annotations):
        raise DatasetError(ann_path, "this is a COCO instances file (annotations hold bbox, no "
                           "segments_info); use --format coco")  # fmt: skip
    bad = non_finite_path(coco["categories"], "categories")
    if bad:
        raise DatasetError(ann_path, f"{bad}, not a number; fix the categories")
    try:
        categories = contiguous_categories(coco["categories"], default_isthing=True)
    except (KeyError, ValueError, TypeError) as exc:
        raise DatasetError(ann_path, f"bad categories ({exc})") from None
    by_image: dict[int, list[dict]] = {}
    for a in annotations:
        image_id = as_int(a.get("image_id"))
        if image_id is None:
            raise DatasetError(ann_path, f"annotation for {str(a.get('file_name'))[:40]} has "
                               f"image_id {str(a.get('image_id'))[:40]!r}, not an image id; fix "
                               "or remove it")  # fmt: skip
        by_image.setdefault(image_id, []).append(a)
    image_list = coco.get("images")
    if not isinstance(image_list, list):
        # Some exports carry only annotations: derive the image names from the PNG names.
        image_list = [{"id": a["image_id"],
                       "file_name": Path(str(a.get("file_name"))).stem + ".jpg"}
                      for a in annotations]  # fmt: skip
    if not all(isinstance(im, dict) for im in image_list):
        raise DatasetError(ann_path, '"images" is not a list of objects')
    image_list = sorted(image_list, key=sort_key)
    problems = image_problems(image_list)
    for i, im in enumerate(image_list):
        twice = len(by_image.get(as_int(im.get("id")), [])) > 1
        if twice and i not in problems:
            problems[i] = (f"image id {im.get('id')} has {len(by_image[as_int(im['id'])])} entries "
                           "in the annotations; give each image one")  # fmt: skip
    orphans = set(by_image) - {as_int(im.get("id")) for im in image_list}
    if orphans:
        why = f" ({next(iter(problems.values()))})" if problems else ""
        raise DatasetError(ann_path, f"annotations refer to unknown image ids "
                           f"{sorted(orphans)[:5]}{why}; fix the images list")  # fmt: skip
    keys = unique_keys([image_stem(im, i) for i, im in enumerate(image_list)])
    known = {c["id"] for c in categories}
    entries = [
        Entry(
            key,
            str(images_dir / str(im.get("file_name", ""))),
            lambda im=im, key=key, i=i: _load(
                images_dir, masks_dir, im, (by_image.get(as_int(im.get("id"))) or [None])[0],
                known, key, problems.get(i),
            ),
        )
        for i, (key, im) in enumerate(zip(keys, image_list, strict=True))
    ]
    info = {
        "format": "coco-panoptic",
        "categories": categories,
        "source": {"images": str(images_dir), "annotations": str(ann_path), "masks": str(masks_dir)},
    }
    return Source(info, entries)
