"""Prediction records for ``cf predict`` (JSON-able) and the overlay drawn from them.

A task's ``describe`` turns one image's post-processed prediction into a record with one of

* ``classes``: the top classes, best first: ``{"label", "category_id", "train_id", "score"}``;
* ``detections``: ``{"label", "category_id", "train_id", "score", "box_xyxy"}``;
* ``segments``: ``{"label", "category_id", "train_id", ["score"], "area", "box_xyxy",
  "rle" (COCO RLE), "color"}`` (panoptic segments add ``id`` and ``isthing``);

and :func:`draw_overlay` draws whatever the record holds on the image: coloured masks, boxes,
the best class. A new task reuses these builders, so its predictions draw with no new code.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

# Distinct colours (tab10, then tab20's light shades), cycled by class or segment.
COLORS = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
          (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207),
          (174, 199, 232), (255, 187, 120), (152, 223, 138), (255, 152, 150), (197, 176, 213))
ALPHA = 0.5
MIN_OVERLAY_SIDE = 256


def category(categories: list[dict], train_id: int) -> dict[str, Any]:
    """``{"label", "category_id", "train_id"}`` of a train id (its number when unknown)."""
    if 0 <= train_id < len(categories):
        found = categories[train_id]
        name, cat_id = str(found.get("name", train_id)), int(found.get("id", train_id))
    else:
        name, cat_id = str(train_id), train_id
    return {"label": name, "category_id": cat_id, "train_id": int(train_id)}


def top_classes(scores: torch.Tensor, categories: list[dict], k: int = 5) -> dict[str, Any]:
    """``(C,)`` class scores (logits) -> ``{"classes": [...]}``, the top ``k`` by softmax."""
    prob = scores.float().softmax(-1)
    top = prob.topk(min(k, prob.numel()))
    return {"classes": [{**category(categories, int(i)), "score": round(v, 4)}
                        for v, i in zip(top.values.tolist(), top.indices.tolist(), strict=True)]}


def detections(pred: dict, categories: list[dict], threshold: float, limit: int) -> dict[str, Any]:
    """``scores``, ``labels``, ``boxes`` (xyxy pixels) -> ``{"detections": [...]}``."""
    keep = pred["scores"] >= threshold
    found = [{**category(categories, int(label)), "score": round(float(score), 4),
              "box_xyxy": [round(v, 2) for v in box]}
             for box, label, score in zip(pred["boxes"][keep].tolist(), pred["labels"][keep].tolist(),
                                          pred["scores"][keep].tolist(), strict=True)]  # fmt: skip
    return {"detections": found[:limit]}


def _rle(mask: torch.Tensor) -> dict:
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(mask.numpy().astype(np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def segment(mask: torch.Tensor, train_id: int, categories: list[dict], index: int,
            score: float | None = None) -> dict[str, Any]:  # fmt: skip
    """One ``(H, W)`` bool mask as a segment record (``index`` picks its colour)."""
    from clusterformer.ops.boxes import masks_to_boxes

    out: dict[str, Any] = category(categories, train_id)
    if score is not None:
        out["score"] = round(float(score), 4)
    out["area"] = int(mask.sum())
    out["box_xyxy"] = [round(v, 2) for v in masks_to_boxes(mask).tolist()]
    out["rle"] = _rle(mask)
    out["color"] = list(COLORS[index % len(COLORS)])
    return out


def label_map_segments(label_map: torch.Tensor, categories: list[dict]) -> dict[str, Any]:
    """An ``(H, W)`` map of train ids -> one segment per class present."""
    return {"segments": [segment(label_map == i, int(i), categories, int(i))
                         for i in torch.unique(label_map).tolist()]}  # fmt: skip


def overlay_scale(height: int, width: int) -> int:
    """Integer enlargement for drawing: images under MIN_OVERLAY_SIDE px on the long side are
    drawn bigger (nearest neighbour) so the labels fit; the JSON keeps original pixels."""
    return max(1, -(-MIN_OVERLAY_SIDE // max(height, width, 1)))


def _draw_segments(canvas: Any, segments: list[dict], scale: int) -> Any:
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
        anchors.append((int(xs[middle]) * scale, int(ys[middle]) * scale, seg))
    out = Image.fromarray(pixels.round().clip(0, 255).astype(np.uint8))
    if scale > 1:
        out = out.resize((out.width * scale, out.height * scale), Image.NEAREST)
    draw = ImageDraw.Draw(out)
    for x, y, seg in anchors:
        text = seg["label"] if "score" not in seg else f"{seg['label']} {seg['score']:.2f}"
        left, top, right, bottom = draw.textbbox((x, y), text)
        draw.rectangle([left - 1, top - 1, right + 1, bottom + 1], fill=tuple(seg["color"]))
        draw.text((x, y), text, fill=(255, 255, 255))
    return out


def draw_overlay(image: torch.Tensor, record: dict[str, Any]) -> Any:
    """The uint8 ``(3, H, W)`` image with ``record``'s segments, boxes and best class drawn
    on it: a PIL image, enlarged by :func:`overlay_scale`."""
    from PIL import Image, ImageDraw

    canvas = Image.fromarray(image.permute(1, 2, 0).contiguous().numpy())
    k = overlay_scale(canvas.height, canvas.width)
    if record.get("segments") is not None:
        canvas = _draw_segments(canvas, record["segments"], k)
    elif k > 1:
        canvas = canvas.resize((canvas.width * k, canvas.height * k), Image.NEAREST)
    draw = ImageDraw.Draw(canvas)
    for det in record.get("detections", []):
        color = COLORS[det["train_id"] % 10]
        x0, y0, x1, y1 = (v * k for v in det["box_xyxy"])
        draw.rectangle([x0, y0, max(x1, x0), max(y1, y0)], outline=color, width=2)
        text = f"{det['label']} {det['score']:.2f}"
        left, top, right, bottom = draw.textbbox((x0, y0), text)
        ty = y0 - (bottom - top) - 2 if y0 - (bottom - top) - 2 >= 0 else y0
        draw.rectangle([x0, ty, x0 + (right - left) + 4, ty + (bottom - top) + 2], fill=color)
        draw.text((x0 + 2, ty), text, fill=(255, 255, 255))
    if record.get("classes"):
        best = record["classes"][0]
        text = f"{best['label']} {best['score']:.2f}"
        _, _, right, bottom = draw.textbbox((2, 2), text)
        draw.rectangle([0, 0, right + 4, bottom + 4], fill=(0, 0, 0))
        draw.text((2, 2), text, fill=(255, 255, 255))
    return canvas
