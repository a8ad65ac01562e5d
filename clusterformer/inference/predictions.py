"""Typed predictions: one dataclass per task, each also the JSON record ``cf predict`` writes
(:meth:`Prediction.to_dict`) and the overlay it draws (:meth:`Prediction.draw`).

Every coordinate and mask is in the input image's own pixels (``height x width``), whatever
size the model ran at. Label ids are the model's *train ids* (0 .. C-1, the index into
``Predictor.categories``); ``category_ids`` are the dataset's own ids of those classes.
Tensors are on the CPU. Objects below ``score_threshold`` and beyond ``max_detections`` are
left out, exactly as from the record.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from clusterformer.registry import Registry
from clusterformer.tasks.predictions import category


@dataclass(kw_only=True)
class Prediction:
    """One image's (or video frame's) prediction; a task without a typed class of its own
    (a plugin task) gets this one.

    Attributes:
        task: the task's name.
        image: the input's path as given, or None for an image given in memory.
        height, width: the input image's size in pixels.
        frame: the video frame number, None for a still image.
        record: the task's part of the record (``task.spec.describe``'s output: JSON values).
        raw: what the task's post-processing gave for this image (tensors on the CPU).
    """

    task: str
    image: str | None
    height: int
    width: int
    frame: int | None = None
    record: dict[str, Any] = field(default_factory=dict, repr=False)
    raw: Any = field(default=None, repr=False)

    def to_dict(self) -> dict[str, Any]:
        """The record ``cf predict`` writes to ``OUT/<name>.json`` (and into
        predictions.json / .jsonl): ``image``, ``frame`` (videos only), ``height``,
        ``width``, ``task`` and the task's lists (``classes`` / ``detections`` /
        ``segments``, README "Prediction records")."""
        frame = {} if self.frame is None else {"frame": self.frame}
        return {"image": self.image, **frame, "height": self.height, "width": self.width,
                "task": self.task, **self.record}  # fmt: skip

    def draw(self, image: Any = None) -> Any:
        """The overlay ``cf predict`` writes (``OUT/<name>.png``) as a PIL RGB image: the
        prediction drawn on ``image`` (a path, PIL image, array or tensor as the predictor
        takes; default: the file this prediction was made from), enlarged when small."""
        from clusterformer.inference.inputs import decode_input
        from clusterformer.tasks.predictions import draw_overlay

        if image is None:
            if self.image is None:
                raise ValueError("this prediction was made from an image in memory: pass that "
                                 "image to draw() to draw on it")  # fmt: skip
            image = self.image
        raw, _ = decode_input(image)
        if tuple(raw.shape[1:]) != (self.height, self.width):
            raise ValueError(f"draw(): the image is {raw.shape[2]} x {raw.shape[1]} px, the "
                             f"prediction's {self.width} x {self.height}")  # fmt: skip
        return draw_overlay(raw, self.to_dict())


def _names(categories: list[dict], labels: Tensor) -> tuple[list[str], Tensor]:
    found = [category(categories, int(i)) for i in labels.tolist()]
    ids = torch.tensor([c["category_id"] for c in found], dtype=torch.int64)
    return [c["label"] for c in found], ids


@dataclass(kw_only=True)
class ClassificationPrediction(Prediction):
    """Attributes (besides :class:`Prediction`'s):
        probs: ``(C,)`` float32 class probabilities (softmax of the model's scores).
        labels: ``(k,)`` int64 train ids of the top ``k = min(5, C)`` classes, best first.
        scores: ``(k,)`` float32 their probabilities.
        label_names: ``k`` class names; category_ids: ``(k,)`` int64 dataset ids.
    """

    probs: Tensor
    labels: Tensor
    scores: Tensor
    label_names: list[str]
    category_ids: Tensor

    @property
    def top_k(self) -> list[tuple[str, float]]:
        """``(class name, probability)`` of the top classes, best first."""
        return [(n, float(s)) for n, s in zip(self.label_names, self.scores, strict=True)]

    @classmethod
    def build(cls, output: Tensor, categories: list[dict], threshold: float, limit: int,
              **common: Any) -> ClassificationPrediction:  # fmt: skip
        probs = output.float().softmax(-1)
        top = probs.topk(min(5, probs.numel()))
        names, ids = _names(categories, top.indices)
        return cls(probs=probs, labels=top.indices, scores=top.values, label_names=names,
                   category_ids=ids, **common)  # fmt: skip


@dataclass(kw_only=True)
class DetectionPrediction(Prediction):
    """Attributes (besides :class:`Prediction`'s), ``N`` objects best first:
        boxes: ``(N, 4)`` float32 ``x0, y0, x1, y1`` in pixels.
        scores: ``(N,)`` float32 in [0, 1]; labels: ``(N,)`` int64 train ids.
        label_names: ``N`` class names; category_ids: ``(N,)`` int64 dataset ids.
    """

    boxes: Tensor
    scores: Tensor
    labels: Tensor
    label_names: list[str]
    category_ids: Tensor

    @classmethod
    def build(cls, output: dict, categories: list[dict], threshold: float, limit: int,
              **common: Any) -> DetectionPrediction:  # fmt: skip
        keep = output["scores"] >= threshold
        labels = output["labels"][keep][:limit].long()
        names, ids = _names(categories, labels)
        return cls(boxes=output["boxes"][keep][:limit].float(), scores=output["scores"][keep][:limit].float(),
                   labels=labels, label_names=names, category_ids=ids, **common)  # fmt: skip


@dataclass(kw_only=True)
class InstancePrediction(DetectionPrediction):
    """Attributes as :class:`DetectionPrediction`, plus
        masks: ``(N, H, W)`` bool, one per object (never empty); ``boxes`` are the masks'
            bounding boxes, as in the record.
    """

    masks: Tensor

    @classmethod
    def build(cls, output: dict, categories: list[dict], threshold: float, limit: int,
              **common: Any) -> InstancePrediction:  # fmt: skip
        from clusterformer.ops.boxes import masks_to_boxes

        keep = (output["scores"] >= threshold) & output["masks"].flatten(1).any(1)
        masks = output["masks"][keep][:limit].bool()
        labels = output["labels"][keep][:limit].long()
        names, ids = _names(categories, labels)
        boxes = masks_to_boxes(masks).float() if len(masks) else torch.zeros(0, 4)
        return cls(boxes=boxes, scores=output["scores"][keep][:limit].float(), labels=labels,
                   label_names=names, category_ids=ids, masks=masks, **common)  # fmt: skip


@dataclass(kw_only=True)
class SemanticPrediction(Prediction):
    """Attributes (besides :class:`Prediction`'s):
        label_map: ``(H, W)`` int64, each pixel's train id.
        labels: ``(K,)`` int64 the train ids present, ascending; label_names: their names;
        category_ids: ``(K,)`` int64 their dataset ids.
    """

    label_map: Tensor
    labels: Tensor
    label_names: list[str]
    category_ids: Tensor

    @classmethod
    def build(cls, output: Tensor, categories: list[dict], threshold: float, limit: int,
              **common: Any) -> SemanticPrediction:  # fmt: skip
        label_map = output.long()
        labels = torch.unique(label_map)
        names, ids = _names(categories, labels)
        return cls(label_map=label_map, labels=labels, label_names=names, category_ids=ids,
                   **common)  # fmt: skip


@dataclass(frozen=True)
class Segment:
    """One panoptic segment: its ``id`` in ``segment_map``, train id ``label``, ``label_name``,
    dataset ``category_id``, ``isthing`` (an object, not stuff) and ``score``."""

    id: int
    label: int
    label_name: str
    category_id: int
    isthing: bool
    score: float


@dataclass(kw_only=True)
class PanopticPrediction(Prediction):
    """Attributes (besides :class:`Prediction`'s):
        segment_map: ``(H, W)`` int64, each pixel's segment id (0: no segment).
        segments: one :class:`Segment` per segment, in the record's order.
    """

    segment_map: Tensor
    segments: list[Segment]

    @property
    def masks(self) -> Tensor:
        """``(K, H, W)`` bool, one per segment in ``segments``' order."""
        ids = torch.tensor([s.id for s in self.segments], dtype=self.segment_map.dtype)
        return self.segment_map[None] == ids[:, None, None]

    @classmethod
    def build(cls, output: dict, categories: list[dict], threshold: float, limit: int,
              **common: Any) -> PanopticPrediction:  # fmt: skip
        segments = []
        for info in output["segments"]:
            found = category(categories, int(info["category_id"]))
            segments.append(Segment(int(info["id"]), found["train_id"], found["label"],
                                    found["category_id"], bool(info["isthing"]),
                                    float(info["score"])))  # fmt: skip
        return cls(segment_map=output["panoptic"].long(), segments=segments, **common)


# The typed prediction of each task; a task without one gets a plain Prediction. A plugin task
# registers its own with ``PREDICTIONS.register(task_name, build)``.
PREDICTIONS: Registry[Callable[..., Prediction]] = Registry("typed prediction")
for _name, _type in (("classification", ClassificationPrediction),
                     ("detection", DetectionPrediction), ("instance", InstancePrediction),
                     ("semantic", SemanticPrediction), ("panoptic", PanopticPrediction)):  # fmt: skip
    PREDICTIONS.register(_name, _type.build)


def make_prediction(raw: Any, task: Any, threshold: float, limit: int, **common: Any) -> Prediction:
    """One image's post-processed output -> its typed prediction. ``task`` is the runtime
    :class:`~clusterformer.tasks.Task`; ``common`` the :class:`Prediction` fields but
    ``task``, ``record`` and ``raw``."""
    raw = _to_cpu(raw)
    record = task.spec.describe(raw, task.categories, threshold, limit)
    common = {**common, "task": task.name, "record": record, "raw": raw}
    if task.name not in PREDICTIONS:
        return Prediction(**common)
    return PREDICTIONS[task.name](raw, task.categories, threshold, limit, **common)


def _to_cpu(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_to_cpu(v) for v in value]
    return value
