"""Mask-classification inference (Mask2Former's), per image, as pure functions.

Inputs per image: class logits ``(Q, C + 1)`` (softmax, last = no object) and mask logits
``(Q, H, W)`` already at the original image size (:func:`masks_to_original`).

* :func:`semantic_inference` -- per-class scores ``einsum(softmax(cls)[:, :C], sigmoid(mask))``.
* :func:`instance_inference` -- top-``k`` over (center, class) pairs of ``softmax(cls)[:, :C]``;
  mask = logit > 0; score = class prob x mean mask probability inside the mask; boxes around
  the masks.
* :func:`panoptic_inference` -- keep centers whose best class is not no-object with probability
  > ``object_threshold``; each pixel goes to the argmax of ``prob * sigmoid(mask)``; a segment
  whose kept area / own mask area (prob >= 0.5) is < ``overlap_threshold`` is dropped; stuff
  segments of the same class merge into one.

Everything runs on one image at a time, so results never depend on batch size or padding.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from clusterformer.ops.boxes import masks_to_boxes


def masks_to_original(
    mask_logits: Tensor, size: tuple[int, int], orig_size: tuple[int, int]
) -> Tensor:
    """Stride-4 mask logits of a padded batch -> logits at the original image size.

    Args:
        mask_logits: ``(Q, H4, W4)`` on the stride-4 grid of the padded batch.
        size: ``(h, w)`` of the image after the eval resize, before padding.
        orig_size: ``(H, W)`` of the source image.

    Returns:
        ``(Q, H, W)`` float32: the real ``ceil(h / 4) x ceil(w / 4)`` tokens, upsampled x4,
        cropped to ``(h, w)`` (undoing the padding), resized to ``(H, W)`` (undoing the resize).
    """
    h, w = (int(v) for v in size)
    real = mask_logits[:, : math.ceil(h / 4), : math.ceil(w / 4)].float().unsqueeze(0)
    up = F.interpolate(real, scale_factor=4.0, mode="bilinear", align_corners=False)[..., :h, :w]
    if (h, w) != tuple(int(v) for v in orig_size):
        up = F.interpolate(up, size=tuple(int(v) for v in orig_size), mode="bilinear",
                           align_corners=False)
    return up[0]


def semantic_inference(class_logits: Tensor, mask_logits: Tensor) -> Tensor:
    """``(Q, C + 1)``, ``(Q, H, W)`` -> ``(C, H, W)`` class scores (argmax = the label map)."""
    probs = class_logits.float().softmax(-1)[:, :-1]
    return torch.einsum("qc,qhw->chw", probs, mask_logits.float().sigmoid())


def instance_inference(
    class_logits: Tensor, mask_logits: Tensor, *, top_k: int = 100
) -> dict[str, Tensor]:
    """Top-``k`` instances of one image.

    Returns:
        ``scores`` (k,), ``labels`` (k,) train ids, ``masks`` (k, H, W) bool, ``boxes``
        (k, 4) xyxy float32 around the masks; ``k = min(top_k, Q * C)``, highest class
        probability first (scores are rescored by mask quality afterwards).
    """
    queries, classes = class_logits.shape[0], class_logits.shape[1] - 1
    probs = class_logits.float().softmax(-1)[:, :-1].flatten()
    class_scores, index = probs.topk(min(top_k, queries * classes))
    query, labels = index // classes, index % classes
    logits = mask_logits.float()[query]
    masks = logits > 0
    inside = masks.flatten(1).float()
    mask_scores = (logits.sigmoid().flatten(1) * inside).sum(1) / (inside.sum(1) + 1e-6)
    return {"scores": class_scores * mask_scores, "labels": labels, "masks": masks,
            "boxes": masks_to_boxes(masks)}


def panoptic_inference(
    class_logits: Tensor,
    mask_logits: Tensor,
    thing_classes: Tensor,
    *,
    object_threshold: float = 0.8,
    overlap_threshold: float = 0.8,
) -> dict:
    """Panoptic segmentation of one image.

    Args:
        thing_classes: ``(C,)`` bool, True for thing classes.

    Returns:
        ``panoptic`` (H, W) int32 segment ids (0 = void, segments numbered 1, 2, ... in
        center order) and ``segments``: list of ``{"id", "category_id" (train id),
        "isthing", "score"}``.
    """
    num_classes = class_logits.shape[1] - 1
    scores, labels = class_logits.float().softmax(-1).max(-1)
    keep = (labels != num_classes) & (scores > object_threshold)
    scores, labels, probs = scores[keep], labels[keep], mask_logits.float()[keep].sigmoid()
    height, width = mask_logits.shape[-2:]
    panoptic = torch.zeros(height, width, dtype=torch.int32, device=mask_logits.device)
    segments: list[dict] = []
    if probs.shape[0] == 0:
        return {"panoptic": panoptic, "segments": segments}
    owner = (scores.view(-1, 1, 1) * probs).argmax(0)
    stuff_ids: dict[int, int] = {}
    for k in range(probs.shape[0]):
        label = int(labels[k])
        isthing = bool(thing_classes[label])
        own = probs[k] >= 0.5
        mask = (owner == k) & own
        kept, area = int((owner == k).sum()), int(own.sum())
        if kept == 0 or area == 0 or int(mask.sum()) == 0 or kept / area < overlap_threshold:
            continue
        if not isthing and label in stuff_ids:
            panoptic[mask] = stuff_ids[label]
            continue
        segment_id = len(segments) + 1
        if not isthing:
            stuff_ids[label] = segment_id
        panoptic[mask] = segment_id
        segments.append({"id": segment_id, "category_id": label, "isthing": isthing,
                         "score": float(scores[k])})
    return {"panoptic": panoptic, "segments": segments}
