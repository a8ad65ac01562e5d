"""Mask predictions for ``cf predict``: segments as JSON (COCO RLE) and coloured overlays.

Every segmentation task gives a list of segments, each ``{"label", "category_id", "train_id",
"score" (instance / panoptic), "area", "box_xyxy", "rle", "color"}``; the overlay blends each
segment's colour over the image and writes its label at a point inside it.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

# tab10 then tab20's light shades: distinct colours, cycled.
COLORS = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
          (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207),
          (174, 199, 232), (255, 187, 120), (152, 223, 138), (255, 152, 150), (197, 176, 213))
ALPHA = 0.5


def _rle(mask: torch.Tensor) -> dict:
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(mask.numpy().astype(np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def _segment(mask: torch.Tensor, train_id: int, categories: list[dict], index: int,
             score: float | None = None) -> dict[str, Any]:
    from clusterformer.ops.boxes import masks_to_boxes

    if 0 <= train_id < len(categories):
        name, cat_id = str(categories[train_id].get("name", train_id)), int(categories[train_id].get("id", train_id))
    else:
        name, cat_id = str(train_id), train_id
    out: dict[str, Any] = {"label": name, "category_id": cat_id, "train_id": int(train_id)}
    if score is not None:
        out["score"] = round(float(score), 4)
    out["area"] = int(mask.sum())
    out["box_xyxy"] = [round(v, 2) for v in masks_to_boxes(mask).tolist()]
    out["rle"] = _rle(mask)
    out["color"] = list(COLORS[index % len(COLORS)])
    return out


def segments_of(task: str, pred: Any, categories: list[dict], threshold: float, limit: int) -> dict:
    """One image's post-processed prediction -> ``{"segments": [...]}`` (JSON-able)."""
    segments = []
    if task == "semantic":
        for train_id in torch.unique(pred).tolist():
            segments.append(_segment(pred == train_id, int(train_id), categories, int(train_id)))
    elif task == "instance":
        keep = (pred["scores"] >= threshold) & pred["masks"].flatten(1).any(1)
        for i, (mask, label, score) in enumerate(zip(pred["masks"][keep][:limit], pred["labels"][keep][:limit].tolist(),
                                                     pred["scores"][keep][:limit].tolist(), strict=True)):
            segments.append(_segment(mask, int(label), categories, i, score))
    else:
        for i, info in enumerate(pred["segments"]):
            seg = _segment(pred["panoptic"] == info["id"], int(info["category_id"]), categories, i, info["score"])
            segments.append({"id": int(info["id"]), "isthing": bool(info["isthing"]), **seg})
    return {"segments": segments}


def draw_segments(canvas: Any, segments: list[dict], scale: int = 1) -> Any:
    """Blend every segment's colour over the PIL image ``canvas`` and label it; returns a new
    image, ``scale`` times larger (nearest neighbour) so labels fit on small images."""
    from PIL import Image, ImageDraw
    from pycocotools import mask as mask_utils

    pixels = np.asarray(canvas.convert("RGB"), dtype=np.float32)
    anchors = []
    for seg in segments:
        rle = {"size": seg["rle"]["size"], "counts": seg["rle"]["counts"].encode("ascii")}
        mask = mask_utils.decode(rle).astype(bool)
        if not mask.any():
            continue
        pixels[mask] = (1 - ALPHA) * pixels[mask] + ALPHA * np.asarray(seg["color"], dtype=np.float32)
        ys, xs = np.nonzero(mask)
        middle = int(np.argmin((ys - ys.mean()) ** 2 + (xs - xs.mean()) ** 2))  # a pixel inside
        anchors.append((int(xs[middle]), int(ys[middle]), seg))
    out = Image.fromarray(pixels.round().clip(0, 255).astype(np.uint8))
    if scale > 1:
        out = out.resize((out.width * scale, out.height * scale), Image.NEAREST)
    draw = ImageDraw.Draw(out)
    for x, y, seg in ((x * scale, y * scale, seg) for x, y, seg in anchors):
        text = seg["label"] if "score" not in seg else f"{seg['label']} {seg['score']:.2f}"
        left, top, right, bottom = draw.textbbox((x, y), text)
        draw.rectangle([left - 1, top - 1, right + 1, bottom + 1], fill=tuple(seg["color"]))
        draw.text((x, y), text, fill=(255, 255, 255))
    return out
