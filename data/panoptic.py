"""COCO panoptic reader (``--format coco-panoptic``): JSON segments_info + id PNGs.

Each sample is checked the way panopticapi does: the PNG's non-zero ids equal the JSON's
segment ids, every segment's area equals its pixel count, and PNG and image sizes agree.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from clusterformer.data.coco_index import (
    annotations_by_image,
    coco_categories,
    image_entries,
    index_images,
)
from clusterformer.data.errors import DatasetError, SampleError
from clusterformer.data.images import decode_panoptic_png
from clusterformer.data.paths import name_problem
from clusterformer.data.records import Record
from clusterformer.data.source import (
    Source,
    as_int,
    non_finite_path,
    read_image,
    read_json,
    read_label_png,
    require_dir,
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
    png_name = ann.get("file_name", Path(path).with_suffix(".png").name)
    if name_problem(png_name):  # "../../x" would read outside --masks
        raise SampleError(masks_dir, key, f"panoptic file_name {str(png_name)[:80]!r} "
                          f"{name_problem(png_name)}")  # fmt: skip
    png = masks_dir / png_name
    label_bytes, ids = read_label_png(png, key, decode_panoptic_png, "panoptic PNG", (height, width))
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


def _unnamed_image(ann: dict) -> str:
    return (f"annotation for {str(ann.get('file_name'))[:40]} has image_id "
            f"{str(ann.get('image_id'))[:40]!r}, not an image id")  # fmt: skip


def _entered_twice(image: dict, anns: list[dict]) -> str | None:
    if len(anns) <= 1:
        return None
    return f"image id {image.get('id')} has {len(anns)} entries in the annotations; give each image one"


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
    categories = coco_categories(ann_path, coco["categories"])
    by_image = annotations_by_image(ann_path, annotations, _unnamed_image)
    image_list = coco.get("images")
    if not isinstance(image_list, list):
        # Some exports carry only annotations: derive the image names from the PNG names.
        image_list = [{"id": a["image_id"],
                       "file_name": Path(str(a.get("file_name"))).stem + ".jpg"}
                      for a in annotations]  # fmt: skip
    if not all(isinstance(im, dict) for im in image_list):
        raise DatasetError(ann_path, '"images" is not a list of objects')
    image_list, problems = index_images(ann_path, image_list, by_image, _entered_twice)
    known = {c["id"] for c in categories}
    entries = image_entries(
        images_dir, image_list, problems, by_image,
        lambda im, anns, key, problem: _load(
            images_dir, masks_dir, im, (anns or [None])[0], known, key, problem),
    )
    info = {
        "format": "coco-panoptic",
        "categories": categories,
        "source": {"images": str(images_dir), "annotations": str(ann_path), "masks": str(masks_dir)},
    }
    return Source(info, entries)
