"""Synthetic shapes dataset written in four real formats (``cf make-shapes``).

Layout under ``out``::

    images/<stem>.jpg                 scenes (things over stuff)
    instances.json                    COCO instances: polygons, crowd RLE, non-contiguous ids
    panoptic.json, panoptic/<stem>.png  COCO panoptic (id = R + 256 G + 256^2 B)
    semantic/<stem>.png, classes.json ADE20K style: 0 = other/ignore, classes from 1
    classes/<class>/<stem>.jpg        ImageFolder: one dominant shape named by its folder

Byte-identical for the same arguments: every image draws from its own
``numpy.random.default_rng([seed, index, stream])``.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
from PIL import Image

from clusterformer.data.images import encode_panoptic_ids
from clusterformer.data.polygons import mask_to_bbox, mask_to_rle
from clusterformer.data.shapes_scene import (
    STUFF_CLASSES,
    THING_CLASSES,
    THING_SCALE,
    classification_image,
    random_scene,
)

# Non-contiguous ids on purpose, like COCO's: readers must map them to train ids.
CATEGORY_IDS = {"circle": 1, "rectangle": 3, "triangle": 7, "ellipse": 12,
                "sky": 21, "ground": 25, "water": 33}  # fmt: skip
SEMANTIC_CLASSES = THING_CLASSES + STUFF_CLASSES  # semantic value = position + 1
JPEG_QUALITY = 92


def _coco_categories(names: tuple[str, ...]) -> list[dict]:
    return [
        {
            "id": CATEGORY_IDS[n],
            "name": n,
            "supercategory": "shape" if n in THING_CLASSES else "background",
            "isthing": int(n in THING_CLASSES),
        }
        for n in names
    ]


def _jpeg(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue()


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG", optimize=False, compress_level=6)
    return buffer.getvalue()


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_bytes(data)
    except OSError as exc:  # e.g. a full disk: no temporary left, and the error names the file
        tmp.unlink(missing_ok=True)
        raise OSError(exc.errno, exc.strerror, str(path)) from None
    os.replace(tmp, path)


def _dump(obj: object) -> bytes:
    return (json.dumps(obj, separators=(",", ":")) + "\n").encode("utf-8")


def _scene_annotations(scene, image_id: int, ann_id: int, size: int):
    """COCO instance annotations, panoptic ids/segments and the semantic map of one scene."""
    annotations, segments = [], []
    ids = np.zeros((size, size), dtype=np.int64)
    semantic = np.zeros((size, size), dtype=np.uint8)
    things_union = np.zeros((size, size), dtype=bool)
    for k, (thing, mask, polygons) in enumerate(
        zip(scene.things, scene.visible, scene.polygons, strict=True)
    ):
        cat = CATEGORY_IDS[thing.name]
        bbox, area = mask_to_bbox(mask), int(mask.sum())
        annotations.append(
            {
                "id": ann_id + k,
                "image_id": image_id,
                "category_id": cat,
                "segmentation": mask_to_rle(mask) if thing.crowd else polygons,
                "area": float(area),
                "bbox": bbox,
                "iscrowd": int(thing.crowd),
            }
        )
        segment_id = cat * 1000 + k + 1
        ids[mask] = segment_id
        semantic[mask] = SEMANTIC_CLASSES.index(thing.name) + 1
        things_union |= mask
        segments.append({"id": segment_id, "category_id": cat, "area": area, "bbox": bbox,
                         "iscrowd": int(thing.crowd)})  # fmt: skip
    for index, name in enumerate(STUFF_CLASSES):
        region = (scene.stuff == index) & ~things_union
        if not region.any():
            continue
        segment_id = CATEGORY_IDS[name] * 1000
        ids[region] = segment_id
        semantic[region] = SEMANTIC_CLASSES.index(name) + 1
        segments.append({"id": segment_id, "category_id": CATEGORY_IDS[name],
                         "area": int(region.sum()), "bbox": mask_to_bbox(region),
                         "iscrowd": 0})  # fmt: skip
    return annotations, segments, ids, semantic


def _write_scene_files(root: Path, info: dict, images: list, coco_anns: list, pan_anns: list) -> None:
    _write(root / "instances.json", _dump({"info": info, "images": images,
           "annotations": coco_anns, "categories": _coco_categories(THING_CLASSES)}))  # fmt: skip
    _write(root / "panoptic.json", _dump({"info": info, "images": images, "annotations": pan_anns,
           "categories": _coco_categories(SEMANTIC_CLASSES)}))  # fmt: skip
    classes = [{"id": 0, "name": "other", "isthing": None}] + [
        {"id": i + 1, "name": n, "isthing": n in THING_CLASSES, "coco_category_id": CATEGORY_IDS[n]}
        for i, n in enumerate(SEMANTIC_CLASSES)
    ]
    _write(root / "classes.json", _dump({"ignore_index": 0, "num_classes": len(SEMANTIC_CLASSES),
           "classes": classes}))  # fmt: skip


KINDS = ("scenes", "classes")


def make_shapes(
    out: str | os.PathLike,
    num_images: int = 64,
    image_size: int = 128,
    seed: int = 0,
    kinds: tuple[str, ...] = KINDS,
    thing_scale: tuple[float, float] = THING_SCALE,
    occlusion: bool = True,
    contrast: bool = False,
) -> dict:
    """Write the synthetic dataset under ``out``; returns paths and counts (see module doc).

    ``kinds`` picks what to write: ``"scenes"`` (images, COCO, panoptic and semantic files)
    and/or ``"classes"`` (the ImageFolder tree of single-shape pictures, one folder a class). Each image has its own random stream,
    so a kind's files are byte-identical whether or not the other kind is written.
    ``thing_scale`` is the radius range of the scenes' things relative to ``image_size``
    (the default gives 5-28 px things at 64 px; the classification pictures use 0.25-0.35).
    ``occlusion=False`` keeps the things apart, so each shows its whole outline, and
    ``contrast=True`` paints each thing in a colour that stands out from what it covers (as
    the classification pictures always are).
    """
    unknown = sorted(set(kinds) - set(KINDS))
    if unknown or not kinds:
        raise ValueError(f"kinds must be a non-empty subset of {', '.join(KINDS)}, got {kinds!r}")
    if num_images < 1:
        raise ValueError(f"--num-images must be at least 1, got {num_images}")
    low, high = thing_scale
    if not 0 < low <= high <= 0.5:
        raise ValueError(f"thing_scale must satisfy 0 < min <= max <= 0.5, got {thing_scale!r}")
    if image_size < 32:
        raise ValueError(f"--image-size must be at least 32, got {image_size}")
    root = Path(out)
    images, coco_anns, pan_anns = [], [], []
    ann_id = 1
    for index in range(num_images):
        stem = f"{index:06d}"
        if "classes" in kinds:
            name = THING_CLASSES[index % len(THING_CLASSES)]
            picture = classification_image(np.random.default_rng([seed, index, 1]), image_size, name)
            _write(root / "classes" / name / f"{stem}.jpg", _jpeg(picture))
        if "scenes" not in kinds:
            continue
        rng = np.random.default_rng([seed, index, 0])
        negative = index % 16 == 5  # COCO has images without annotations
        num_things = 0 if negative else int(rng.integers(1, 6))
        scene = random_scene(rng, image_size, num_things, index % 7 == 3, thing_scale, occlusion,
                             contrast)  # fmt: skip
        image_id = index + 1
        anns, segments, ids, semantic = _scene_annotations(scene, image_id, ann_id, image_size)
        ann_id += len(anns)
        _write(root / "images" / f"{stem}.jpg", _jpeg(scene.image))
        _write(root / "panoptic" / f"{stem}.png", _png(encode_panoptic_ids(ids)))
        _write(root / "semantic" / f"{stem}.png", _png(semantic))
        images.append({"id": image_id, "file_name": f"{stem}.jpg", "height": image_size,
                       "width": image_size})  # fmt: skip
        coco_anns.extend(anns)
        pan_anns.append({"image_id": image_id, "file_name": f"{stem}.png", "segments_info": segments})

    info = {"description": "clusterformer synthetic shapes", "seed": seed, "version": "1"}
    if "scenes" in kinds:
        _write_scene_files(root, info, images, coco_anns, pan_anns)
    return {
        "root": str(root),
        "images": str(root / "images"),
        "instances": str(root / "instances.json"),
        "panoptic_json": str(root / "panoptic.json"),
        "panoptic_masks": str(root / "panoptic"),
        "semantic_masks": str(root / "semantic"),
        "classes_json": str(root / "classes.json"),
        "classes": str(root / "classes"),
        "num_images": num_images,
        "num_annotations": len(coco_anns),
        "num_segments": sum(len(a["segments_info"]) for a in pan_anns),
        "thing_classes": list(THING_CLASSES),
        "stuff_classes": list(STUFF_CLASSES),
    }
