"""The per-sample record format shared by raw readers, the shard writer and the shard loader.

A record is what one WebDataset sample holds (tar members ``<key>.<suffix>``):

* ``<key>.<ext>``     the ORIGINAL encoded image bytes (ext: jpg, png, ...), never re-encoded
* ``<key>.json``      the annotation (UTF-8 JSON, schema below)
* ``<key>.label.png`` panoptic id PNG / semantic class PNG, bytes unchanged (those formats only)

``<key>.json`` always has "key", "format", "image" (the image member's suffix), "file_name"
(source path relative to the images folder), "image_id", "height", "width" (after EXIF
orientation) and per format:

* imagefolder:   "label" (train id), "class" (folder name)
* coco:          "annotations": the source annotation dicts (id, category_id with the ORIGINAL
                 ids, bbox [x, y, w, h], area, iscrowd, segmentation as polygons or RLE)
* coco-panoptic: "segments_info": the source segments (id, category_id, area, bbox, iscrowd),
                 "label_file": the PNG's source name
* ade20k:        "label_file": the label PNG's source name (raw values; 0 = ignore in ADE)

``decode_record`` turns members + the dataset info (dataset.json) into the decoded sample dict
of data_interface.md; category ids are mapped to train ids there, so shards keep original ids.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass

import numpy as np

from clusterformer.data.categories import id_to_train_id, semantic_lut
from clusterformer.data.images import (
    IMAGE_EXTENSIONS,
    decode_image_array,
    decode_label_map,
    decode_panoptic_png,
)
from clusterformer.data.paths import check_name

FORMATS = ("coco", "coco-panoptic", "ade20k", "imagefolder")
LABEL_SUFFIX = "label.png"


@dataclass(frozen=True)
class Record:
    """One sample ready to be written: raw bytes plus its JSON annotation.

    ``path`` is the source image path, kept for error messages only (not written).
    """

    key: str
    image_ext: str
    image_bytes: bytes
    annotation: dict
    label_png: bytes | None = None
    path: str = ""


def encode_record(record: Record) -> dict[str, bytes]:
    """Record -> {suffix: bytes} (webdataset member suffixes, without the key)."""
    annotation = dict(record.annotation)
    annotation["key"] = record.key
    annotation["image"] = record.image_ext
    members = {
        record.image_ext: record.image_bytes,
        "json": json.dumps(annotation, sort_keys=True, separators=(",", ":")).encode("utf-8"),
    }
    if record.label_png is not None:
        members[LABEL_SUFFIX] = record.label_png
    return members


def _suffix_members(members: dict) -> dict[str, bytes]:
    """Accept suffix-keyed dicts (webdataset samples) or full member names (``key.suffix``)."""
    plain = {k: v for k, v in members.items() if not str(k).startswith("__")}
    if "json" in plain:
        return plain
    names = [k for k in plain if str(k).endswith(".json")]
    if len(names) != 1:
        raise ValueError(f"record has no single .json member (members: {sorted(plain)})")
    prefix = names[0][: -len("json")]
    return {k[len(prefix) :] if k.startswith(prefix) else k: v for k, v in plain.items()}


def _as_bytes(value: object) -> bytes:
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value)
    if isinstance(value, str):
        return value.encode("utf-8")
    raise TypeError(f"member value must be bytes, got {type(value).__name__}")


def segmentation_to_mask(segmentation: object, height: int, width: int, bbox=None) -> np.ndarray:
    """COCO segmentation (polygons, uncompressed or compressed RLE) -> bool (H, W).

    An annotation without segmentation (detection-only data) gets its box filled.
    """
    from pycocotools import mask as mask_utils

    if isinstance(segmentation, list) and segmentation:
        polygons = [p for p in segmentation if len(p) >= 6]
        if not polygons:
            return np.zeros((height, width), dtype=bool)
        rle = mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))
    elif isinstance(segmentation, dict) and "counts" in segmentation:
        if isinstance(segmentation["counts"], list):
            rle = mask_utils.frPyObjects(segmentation, height, width)
        else:
            rle = dict(segmentation)
            if isinstance(rle["counts"], str):
                rle["counts"] = rle["counts"].encode("ascii")
    else:
        mask = np.zeros((height, width), dtype=bool)
        if bbox is not None:
            x, y, w, h = (float(v) for v in bbox)
            x0, y0 = max(int(np.floor(x)), 0), max(int(np.floor(y)), 0)
            x1, y1 = min(int(np.ceil(x + w)), width), min(int(np.ceil(y + h)), height)
            mask[y0:y1, x0:x1] = True
        return mask
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # pycocotools vs numpy 2
        return mask_utils.decode(rle).astype(bool)


def xywh_to_xyxy(boxes: list, height: int, width: int) -> np.ndarray:
    """COCO [x, y, w, h] boxes -> float32 (n, 4) xyxy, clipped to the image."""
    array = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    out = np.concatenate([array[:, :2], array[:, :2] + array[:, 2:]], axis=1)
    out[:, 0::2] = out[:, 0::2].clip(0, width)
    out[:, 1::2] = out[:, 1::2].clip(0, height)
    return out.astype(np.float32)


def _image_member(members: dict[str, bytes], annotation: dict) -> bytes:
    ext = annotation.get("image")
    if ext in members:
        return _as_bytes(members[ext])
    for suffix in IMAGE_EXTENSIONS:
        if suffix in members:
            return _as_bytes(members[suffix])
    raise ValueError(f"record {annotation.get('key')} has no image member")


def _decode_coco(annotation: dict, info: dict, h: int, w: int) -> dict:
    import torch

    table = id_to_train_id(info["categories"])
    anns = annotation.get("annotations", [])
    labels = [table[int(a["category_id"])] for a in anns]
    masks = np.zeros((len(anns), h, w), dtype=bool)
    for i, ann in enumerate(anns):
        masks[i] = segmentation_to_mask(ann.get("segmentation"), h, w, ann.get("bbox"))
    return {
        "boxes": torch.from_numpy(xywh_to_xyxy([a["bbox"] for a in anns], h, w)),
        "labels": torch.tensor(labels, dtype=torch.int64),
        "iscrowd": torch.tensor([bool(a.get("iscrowd", 0)) for a in anns], dtype=torch.bool),
        "masks": torch.from_numpy(masks),
    }


def _decode_panoptic(annotation: dict, info: dict, label_png: bytes, h: int, w: int) -> dict:
    import torch

    key = annotation.get("key", "?")
    ids = decode_panoptic_png(label_png, f"sample {key} label")
    if ids.shape != (h, w):
        raise ValueError(f"sample {key}: panoptic PNG is {ids.shape}, image is {(h, w)}")
    table = id_to_train_id(info["categories"])
    isthing = {int(c["id"]): bool(c["isthing"]) for c in info["categories"]}
    segments = annotation.get("segments_info", [])
    masks = np.stack([ids == int(s["id"]) for s in segments]) if segments else np.zeros((0, h, w), bool)
    return {
        "masks": torch.from_numpy(masks),
        "labels": torch.tensor([table[int(s["category_id"])] for s in segments], dtype=torch.int64),
        "isthing": torch.tensor([isthing[int(s["category_id"])] for s in segments], dtype=torch.bool),
        "iscrowd": torch.tensor([bool(s.get("iscrowd", 0)) for s in segments], dtype=torch.bool),
        "boxes": torch.from_numpy(xywh_to_xyxy([s["bbox"] for s in segments], h, w)),
        "segment_ids": torch.tensor([int(s["id"]) for s in segments], dtype=torch.int64),
    }


def _decode_semantic(annotation: dict, info: dict, label_png: bytes, h: int, w: int) -> dict:
    import torch

    key = annotation.get("key", "?")
    raw = decode_label_map(label_png, f"sample {key} label")
    if raw.shape != (h, w):
        raise ValueError(f"sample {key}: label map is {raw.shape}, image is {(h, w)}")
    lut = semantic_lut(info["categories"], max_value=max(int(raw.max(initial=0)), 255))
    return {"semantic": torch.from_numpy(lut[raw])}


def decode_record(members: dict, info: dict) -> dict:
    """Tar members of one sample + dataset info -> the decoded sample dict (data_interface.md).

    ``members`` maps suffixes ("jpg", "json", "label.png"; webdataset's sample dicts, whose
    "__key__" etc. are ignored) or full member names ("<key>.jpg") to bytes. ``info`` needs
    "format" and "categories". Image: uint8 (3, H, W); the rest as the format defines.
    """
    import torch

    plain = _suffix_members(members)
    try:
        annotation = json.loads(_as_bytes(plain["json"]).decode("utf-8"))
    except RecursionError:
        raise ValueError("annotation JSON is nested too deeply") from None
    if not isinstance(annotation, dict):
        raise ValueError(f"annotation JSON is a {type(annotation).__name__}, not an object")
    # Evaluation names prediction files after the key: it must be a name inside a folder.
    key = check_name(annotation.get("key", members.get("__key__", "")), "sample key")
    image = decode_image_array(_image_member(plain, annotation), f"sample {key}")
    h, w = image.shape[:2]
    sample = {
        "key": key,
        "image": torch.from_numpy(image.transpose(2, 0, 1).copy()),
        "image_id": int(annotation.get("image_id", 0)),
        "orig_size": (int(h), int(w)),
    }
    fmt = info.get("format", annotation.get("format"))
    if fmt == "imagefolder":
        sample["label"] = int(annotation["label"])
    elif fmt == "coco":
        sample.update(_decode_coco(annotation, info, h, w))
    elif fmt == "coco-panoptic":
        sample.update(_decode_panoptic(annotation, info, _as_bytes(plain[LABEL_SUFFIX]), h, w))
    elif fmt == "ade20k":
        sample.update(_decode_semantic(annotation, info, _as_bytes(plain[LABEL_SUFFIX]), h, w))
    else:
        raise ValueError(f"unknown dataset format {fmt!r} (expected one of {', '.join(FORMATS)})")
    return sample
