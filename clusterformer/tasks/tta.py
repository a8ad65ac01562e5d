"""Test-time strategies over a task's passes: sliding-window inference (mmsegmentation's) and
flip / multi-scale test-time augmentation (TTA).

* :func:`slide_windows` / :func:`slide_inference` -- windows of ``window`` px every
  ``stride`` px, the last one of each row and column moved back to end at the border; the
  per-window scores are summed and divided by how many windows cover each pixel.
* :func:`view_batch` -- one TTA view of a batch: every image's real (unpadded) region scaled
  and / or mirrored, padded again.
* :func:`predict_batch` -- the task's predictions (the form ``task.postprocess`` gives) from
  one plain pass, or from every view of a :class:`InferencePlan`, merged by the task
  (``Task.view_scores`` / ``unflip_view`` / ``combine_views`` / ``finish_views``).

Which tasks take which strategy is the task spec's ``test_time`` (``"slide"``, ``"tta"``):
callers ask the spec, never a task name. Sliding windows need a task whose views are per-pixel
class probabilities ``(C, H, W)`` and that gives window scores (``Task.window_scores``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from clusterformer.tasks.spec import Batch, Task, TaskSpec

Check = Callable[[Any], None]
Context = Callable[[], contextlib.AbstractContextManager]


@dataclass(frozen=True)
class InferencePlan:
    """How to predict one batch.

    Attributes:
        slide: ``(window, stride)`` in pixels of the model's input, or None for whole images.
        flip: also run every scale on the mirrored image.
        scales: input scale factors (1.0 = the eval transform's size); always holds 1.0.
    """

    slide: tuple[int, int] | None = None
    flip: bool = False
    scales: tuple[float, ...] = (1.0,)

    @property
    def active(self) -> bool:
        return self.slide is not None or self.flip or self.scales != (1.0,)

    def views(self) -> list[tuple[float, bool]]:
        """Every (scale, mirrored) pass, the plain one first."""
        flips = (False, True) if self.flip else (False,)
        return [(scale, flip) for scale in self.scales for flip in flips]


def make_plan(spec: TaskSpec, slide: tuple[int, int] | None, tta: str | None) -> InferencePlan:
    """The plan for ``--slide WINDOW STRIDE`` and ``--tta SPEC`` on a task, checked against
    what the task's spec supports.

    Raises:
        ValueError: a strategy the task lacks (naming the tasks that have it), a bad window.
    """
    from clusterformer.tasks.registry import task_names, task_spec

    flip, scales = parse_tta(tta)
    plan = InferencePlan(slide=tuple(slide) if slide else None, flip=flip, scales=scales)
    wanted = {"slide": plan.slide is not None, "tta": flip or scales != (1.0,)}
    for strategy, flag in (("slide", "--slide"), ("tta", "--tta")):
        if wanted[strategy] and strategy not in spec.test_time:
            having = [n for n in task_names() if strategy in task_spec(n).test_time]
            raise ValueError(f"{flag}: the {spec.name} task does not support it (tasks that do: "
                             f"{', '.join(having) or 'none'})")  # fmt: skip
    if plan.slide is not None and not (plan.slide[0] >= 1 and 1 <= plan.slide[1] <= plan.slide[0]):
        raise ValueError(f"--slide WINDOW STRIDE: need WINDOW >= STRIDE >= 1 px, got "
                         f"{plan.slide[0]} {plan.slide[1]}")  # fmt: skip
    return plan


def parse_tta(text: str | None) -> tuple[bool, tuple[float, ...]]:
    """``"flip"``, ``"0.75,1.25"``, ``"flip,0.75,1.25"`` -> (flip, scales sorted with 1.0 in).

    Raises:
        ValueError: an entry that is neither ``flip`` nor a positive number.
    """
    flip, scales = False, {1.0}
    for part in (p.strip() for p in (text or "").split(",")):
        if not part or part.lower() in ("none", "1", "1.0"):
            continue
        if part.lower() == "flip":
            flip = True
            continue
        try:
            scale = float(part)
        except ValueError:
            raise ValueError(f"--tta: '{part}' is neither 'flip' nor a scale such as 0.75") from None
        if not 0.0 < scale <= 8.0:
            raise ValueError(f"--tta: scale {part} must be in (0, 8]")
        scales.add(scale)
    return flip, tuple(sorted(scales))


def slide_windows(height: int, width: int, window: int, stride: int) -> list[tuple[int, int, int, int]]:
    """The windows mmsegmentation's ``slide_inference`` visits, as ``(top, left, bottom, right)``.

    ``ceil((H - window) / stride) + 1`` rows (one when the image is no taller than the window),
    the same for columns; a window starts every ``stride`` px and the last one is moved back to
    end at the border, so no window leaves the image. A side shorter than ``window`` gives
    windows as long as that side.
    """
    if window < 1 or stride < 1:
        raise ValueError(f"window and stride must be >= 1 px, got {window} and {stride}")
    rows = max(height - window + stride - 1, 0) // stride + 1
    cols = max(width - window + stride - 1, 0) // stride + 1
    out = []
    for r in range(rows):
        for c in range(cols):
            bottom, right = min(r * stride + window, height), min(c * stride + window, width)
            out.append((max(bottom - window, 0), max(right - window, 0), bottom, right))
    return out


def slide_inference(
    images: Tensor,
    window_scores: Callable[[Tensor], Tensor],
    window: int,
    stride: int,
    *,
    windows_per_pass: int = 8,
) -> Tensor:
    """Per-pixel scores of images larger than the model's window (mmsegmentation's semantics).

    Args:
        images: ``(B, 3, H, W)``, every pixel real (no padding).
        window_scores: ``(N, 3, h, w) -> (N, C, h, w)`` scores of windows (all of one size).
        window, stride: window side and step in pixels.
        windows_per_pass: how many window positions go through ``window_scores`` at once (each
            position brings its ``B`` crops).

    Returns:
        ``(B, C, H, W)`` float32: the sum of the scores of every window covering a pixel,
        divided by their number.
    """
    batch, _, height, width = images.shape
    boxes = slide_windows(height, width, window, stride)
    total: Tensor | None = None
    count = torch.zeros(1, 1, height, width, device=images.device)
    for start in range(0, len(boxes), windows_per_pass):
        chunk = boxes[start:start + windows_per_pass]
        crops = torch.cat([images[:, :, top:bottom, left:right] for top, left, bottom, right in chunk])
        scores = window_scores(crops).float()
        if scores.shape[0] != crops.shape[0] or scores.shape[-2:] != crops.shape[-2:]:
            raise ValueError(f"window scores of shape {tuple(scores.shape)} for windows of shape "
                             f"{tuple(crops.shape)}: expected (N, C, h, w) at the window size")
        if total is None:
            total = scores.new_zeros(batch, scores.shape[1], height, width)
        for i, (top, left, bottom, right) in enumerate(chunk):
            total[:, :, top:bottom, left:right] += scores[i * batch:(i + 1) * batch]
            count[:, :, top:bottom, left:right] += 1
    assert total is not None  # at least one window always exists
    return total / count


def view_batch(batch: Batch, scale: float, flip: bool) -> Batch:
    """One TTA view of a loader batch: the real region of every image scaled by ``scale``
    (bilinear, antialiased when shrinking) and mirrored left-right when ``flip``, zero-padded
    again; ``targets[i]["size"]`` follows, ``orig_size`` stays, so post-processing maps back
    to the original image. Returns a new dict (the inputs are never written)."""
    if scale == 1.0 and not flip:
        return batch
    images, targets = batch["images"], batch.get("targets")
    sizes = ([tuple(int(v) for v in t["size"]) for t in targets] if targets is not None
             else [tuple(images.shape[-2:])] * images.shape[0])  # fmt: skip
    views = []
    for i, (h, w) in enumerate(sizes):
        image = images[i:i + 1, :, :h, :w]
        if scale != 1.0:
            size = (max(1, round(h * scale)), max(1, round(w * scale)))
            image = F.interpolate(image, size=size, mode="bilinear", align_corners=False,
                                  antialias=scale < 1.0)  # fmt: skip
        views.append(image.flip(-1) if flip else image)
    height = max(v.shape[-2] for v in views)
    width = max(v.shape[-1] for v in views)
    out = images.new_zeros(len(views), images.shape[1], height, width)
    mask = torch.zeros(len(views), height, width, dtype=torch.bool, device=images.device)
    for i, v in enumerate(views):
        out[i, :, :v.shape[-2], :v.shape[-1]] = v[0]
        mask[i, :v.shape[-2], :v.shape[-1]] = True
    new = {**batch, "images": out, "pixel_mask": mask}
    if targets is not None:
        new["targets"] = [{**t, "size": (int(v.shape[-2]), int(v.shape[-1]))}
                          for t, v in zip(targets, views, strict=True)]  # fmt: skip
    return new


def _forward(task: Task, model: torch.nn.Module, batch: Batch, check: Check | None,
             context: Context | None = None) -> Any:  # fmt: skip
    with context() if context is not None else contextlib.nullcontext():
        outputs = task.forward(model, batch)
    if check is not None:
        check(outputs)
    return outputs


def slide_view(task: Task, model: torch.nn.Module, batch: Batch, window: int, stride: int,
               check: Check | None = None, context: Context | None = None) -> list[Tensor]:  # fmt: skip
    """Per image: ``(C, H, W)`` class probabilities at its original size from sliding windows
    over its real region at the batch's input size (scores bilinearly resized to the original
    size, then normalised to sum 1 per pixel)."""

    def window_scores(crops: Tensor) -> Tensor:
        size = tuple(int(v) for v in crops.shape[-2:])
        windows = {"images": crops, "pixel_mask": None,
                   "targets": [{"size": size, "orig_size": size}] * crops.shape[0]}
        return task.window_scores(_forward(task, model, windows, check, context), windows)

    out = []
    for i, target in enumerate(batch["targets"]):
        h, w = (int(v) for v in target["size"])
        scores = slide_inference(batch["images"][i:i + 1, :, :h, :w], window_scores, window, stride)
        orig = tuple(int(v) for v in target["orig_size"])
        if orig != (h, w):
            scores = F.interpolate(scores, size=orig, mode="bilinear", align_corners=False)
        out.append(normalise_scores(scores[0]))
    return out


def normalise_scores(scores: Tensor) -> Tensor:
    """``(C, H, W)`` non-negative class scores -> per-pixel probabilities (sum 1 over C)."""
    return scores / scores.sum(0, keepdim=True).clamp_min(1e-12)


def predict_batch(task: Task, model: torch.nn.Module, batch: Batch, test_time: InferencePlan | None = None,
                  check: Check | None = None, context: Context | None = None) -> Any:  # fmt: skip
    """The task's predictions for ``batch`` (the form ``task.postprocess`` returns).

    Without an active ``test_time`` this is one pass: ``task.postprocess(task.forward(...))``.
    Otherwise every view (scale x flip) is predicted -- with sliding windows when
    ``test_time.slide`` is set -- mirrored back, and merged by the task. ``check`` sees every
    raw model output (the callers' NaN check); ``context()`` wraps every model call (the
    callers' autocast), never the post-processing.
    """
    if test_time is None or not test_time.active:
        return task.postprocess(_forward(task, model, batch, check, context), batch)
    combined: list[Any] | None = None
    views = test_time.views()
    for scale, flip in views:
        view = view_batch(batch, scale, flip)
        if test_time.slide is not None:
            scores = slide_view(task, model, view, *test_time.slide, check=check, context=context)
        else:
            scores = task.view_scores(_forward(task, model, view, check, context), view)
        if flip:
            targets = batch.get("targets") or [{}] * len(scores)
            scores = [task.unflip_view(s, t.get("orig_size")) for s, t in zip(scores, targets, strict=True)]
        combined = scores if combined is None else [task.combine_views(a, b)
                                                    for a, b in zip(combined, scores, strict=True)]
    assert combined is not None
    return task.finish_views(combined, len(views))
