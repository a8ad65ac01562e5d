"""COCO instances reader (``--format coco``): boxes, polygons, RLE and crowd regions.

Annotations keep COCO's original category ids; ``info["categories"]`` maps them to train ids.
Width and height in the JSON must match the image after EXIF orientation, as in COCO.
"""

from __future__ import annotations

from pathlib import Path

from clusterformer.data.coco_index import (
    annotations_by_image,
    coco_categories,
    image_entries,
    index_images,
)
from clusterformer.data.errors import DatasetError, SampleError
from clusterformer.data.images import exif_orientation
from clusterformer.data.records import Record
from clusterformer.data.source import (
    Source,
    as_int,
    non_finite_path,
    read_image,
    read_json,
    require_dir,
)

# Polygons traced along pixel edges may touch the far border: allow that much overhang.
BOX_TOLERANCE = 1.0


def check_box(bbox: object, height: int, width: int) -> str | None:
    """Why a COCO [x, y, w, h] box is unusable for an image of (height, width), or None."""
    if not isinstance(bbox, list | tuple) or len(bbox) != 4:
        return f"bbox {bbox!r} is not [x, y, w, h]"
    try:
        x, y, w, h = (float(v) for v in bbox)
    except (TypeError, ValueError):
        return f"bbox {bbox!r} is not numeric"
    if not w > 0 or not h > 0:
        return f"bbox {list(bbox)} has zero area"
    t = BOX_TOLERANCE
    if x < -t or y < -t or x + w > width + t or y + h > height + t:
        return f"bbox {list(bbox)} lies outside the {width}x{height} image"
    return None


def _check_segmentation(segmentation: object, height: int, width: int) -> str | None:
    if segmentation is None or segmentation == []:
        return None
    if isinstance(segmentation, dict):
        size = segmentation.get("size")
        if "counts" not in segmentation or list(size or []) != [height, width]:
            return f"RLE size {size} does not match the {width}x{height} image"
        return None
    if isinstance(segmentation, list):
        for polygon in segmentation:
            if not isinstance(polygon, list) or len(polygon) < 6 or len(polygon) % 2:
                return "segmentation polygon needs an even number (>= 6) of coordinates"
        return None
    return f"segmentation of type {type(segmentation).__name__} is neither polygons nor RLE"


def _load(images_dir: Path, image: dict, anns: list[dict], known: set[int], key: str,
          problem: str | None) -> Record:  # fmt: skip
    path = images_dir / str(image.get("file_name", ""))
    if problem:  # found while indexing the images list (no id, duplicate id, NaN)
        raise SampleError(path, key, problem)
    for ann in anns:
        bad = non_finite_path(ann)
        if bad:
            raise SampleError(path, key, f"annotation {ann.get('id')}: {bad}, not a number")
    data, ext, height, width = read_image(path, key)
    want = (as_int(image.get("height", height)), as_int(image.get("width", width)))
    if None in want:
        raise SampleError(path, key, f"image size {image.get('width')}x{image.get('height')} in "
                          "the annotations is not a whole number")  # fmt: skip
    if want != (height, width):
        hint = ""
        if want == (width, height) and exif_orientation(data) in (5, 6, 7, 8):
            hint = " (the annotations seem to ignore the EXIF rotation)"
        raise SampleError(
            path, key, f"image is {width}x{height} after EXIF orientation, the annotations "
            f"say {want[1]}x{want[0]}{hint}"
        )  # fmt: skip
    for ann in anns:
        if as_int(ann.get("category_id")) not in known:
            raise SampleError(path, key, f"annotation {ann.get('id')}: unknown category id "
                              f"{ann.get('category_id')}")  # fmt: skip
        area = ann.get("area")
        if isinstance(area, int | float) and area <= 0:
            raise SampleError(path, key, f"annotation {ann.get('id')}: area {area} is zero")
        problem = check_box(ann.get("bbox"), height, width) or _check_segmentation(
            ann.get("segmentation"), height, width
        )
        if problem:
            raise SampleError(path, key, f"annotation {ann.get('id')}: {problem}")
    annotation = {
        "format": "coco",
        "file_name": str(image["file_name"]),
        "image_id": as_int(image["id"]),
        "height": height,
        "width": width,
        "annotations": anns,
    }
    return Record(key, ext, data, annotation, path=str(path))


def _unnamed_image(ann: dict) -> str:
    given = f"image_id {str(ann['image_id'])[:40]!r}" if "image_id" in ann else "no image_id"
    return f"annotation {str(ann.get('id'))[:40]} has {given}"


def read_coco(images: str | Path, annotations: str | Path) -> Source:
    """COCO instances JSON + image folder -> Source (one entry per image, negatives kept)."""
    images_dir = require_dir(Path(images), "images")
    ann_path = Path(annotations)
    coco = read_json(ann_path, "annotations file")
    if not isinstance(coco, dict) or not isinstance(coco.get("images"), list):
        raise DatasetError(ann_path, 'not a COCO instances file (no "images" list)')
    if not isinstance(coco.get("categories"), list) or not coco["categories"]:
        raise DatasetError(ann_path, 'not a COCO instances file (no "categories" list)')
    annotations = coco.get("annotations", [])
    if not isinstance(annotations, list) or not all(isinstance(a, dict) for a in annotations):
        raise DatasetError(ann_path, '"annotations" is not a list of objects')
    if not all(isinstance(im, dict) for im in coco["images"]):
        raise DatasetError(ann_path, '"images" is not a list of objects')
    if annotations and all("segments_info" in a and "bbox" not in a for a in annotations):
        raise DatasetError(ann_path, "this is a COCO panoptic file (annotations hold "
                           "segments_info); use --format coco-panoptic with --masks "
                           "PNG_FOLDER")  # fmt: skip
    categories = coco_categories(ann_path, coco["categories"])
    by_image = annotations_by_image(ann_path, annotations, _unnamed_image)
    image_list, problems = index_images(ann_path, coco["images"], by_image)
    known = {c["id"] for c in categories}
    entries = image_entries(
        images_dir, image_list, problems, by_image,
        lambda im, anns, key, problem: _load(images_dir, im, anns, known, key, problem),
    )
    info = {
        "format": "coco",
        "categories": categories,
        "source": {"images": str(images_dir), "annotations": str(ann_path)},
    }
    return Source(info, entries)
