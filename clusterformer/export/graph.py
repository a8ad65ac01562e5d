"""What an exported graph computes: the model wrapped to a tuple of named tensors.

Every task is one :class:`TaskExport` entry in :data:`TASK_EXPORTS`: how to pick the raw head
outputs from the model's output (auxiliary and encoder outputs are dropped) and, where the
task's post-processing fits in a graph, how to post-process them. Adding a task is one entry.

Graph input: ``images`` float32 ``(B, 3, H, W)``, RGB scaled to ``[0, 1]`` and normalised with
the checkpoint's mean/std, no padding mask (every pixel is real). Outputs:

* classification: ``logits`` ``(B, C)``; with post-processing ``probs`` ``(B, C)`` (softmax).
* detection: ``pred_logits`` ``(B, Q, C)`` (sigmoid scores' logits), ``pred_boxes``
  ``(B, Q, 4)`` (cx, cy, w, h) in ``[0, 1]`` of the input; with post-processing the top
  ``k = min(100, Q*C)`` (query, class) pairs by ``sigmoid(logit)``: ``scores`` ``(B, k)``,
  ``labels`` ``(B, k)`` int64 train ids, ``boxes`` ``(B, k, 4)`` (x0, y0, x1, y1) in input
  pixels, clipped to the input — the same as ``cf predict`` / ``cf eval`` before the resize
  back to the original image.
* instance / semantic / panoptic: ``pred_logits`` ``(B, Q, C+1)``, ``pred_masks``
  ``(B, Q, H/4, W/4)`` mask logits (no in-graph post-processing: the panoptic and instance
  merges are data-dependent loops).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

DETECTION_TOP_K = 100
Outputs = tuple[Tensor, ...]


@dataclass(frozen=True)
class TaskExport:
    """How one task's model becomes a graph.

    Attributes:
        raw: model output -> raw head tensors, in the order of ``raw_names``.
        raw_names: output names of the raw graph.
        postprocess: ``(raw tensors, images) -> post-processed tensors`` or ``None`` when
            the task's post-processing cannot live in a graph.
        post_names: output names of the post-processed graph.
    """

    raw: Callable[[Any], Outputs]
    raw_names: tuple[str, ...]
    postprocess: Callable[[Outputs, Tensor], Outputs] | None = None
    post_names: tuple[str, ...] = ()

    def names(self, with_postprocess: bool) -> tuple[str, ...]:
        return self.post_names if with_postprocess else self.raw_names


def _keys(*keys: str) -> Callable[[Any], Outputs]:
    def pick(outputs: Any) -> Outputs:
        return tuple(outputs[k] for k in keys)

    return pick


def _softmax(raw: Outputs, images: Tensor) -> Outputs:
    """``logits (B, C) -> probs (B, C)``."""
    return (raw[0].softmax(-1),)


def detection_topk(raw: Outputs, images: Tensor, top_k: int = DETECTION_TOP_K) -> Outputs:
    """Sigmoid scores, top-``k`` over queries x classes, xyxy boxes in input pixels.

    Args:
        raw: ``pred_logits (B, Q, C)``, ``pred_boxes (B, Q, 4)`` cxcywh in ``[0, 1]``.
        images: ``(B, 3, H, W)``: only its size is used (boxes are scaled to it).

    Returns:
        ``scores (B, k)``, ``labels (B, k)`` int64, ``boxes (B, k, 4)`` xyxy float32.
    """
    logits, boxes = raw
    _, queries, classes = logits.shape
    prob = logits.float().sigmoid().flatten(1)
    scores, index = prob.topk(min(top_k, queries * classes), dim=1)
    query, labels = index // classes, index % classes
    picked = boxes.float().gather(1, query.unsqueeze(-1).expand(-1, -1, 4))
    cx, cy, w, h = picked.unbind(-1)
    # The size as a tensor computed from the input (not a Python number), so the graph stays
    # dynamic in H and W under torch.export and ONNX.
    height = torch.ones_like(images[0, 0, :, 0]).sum()
    width = torch.ones_like(images[0, 0, 0, :]).sum()
    x0 = torch.minimum(((cx - 0.5 * w) * width).clamp_min(0), width)
    y0 = torch.minimum(((cy - 0.5 * h) * height).clamp_min(0), height)
    x1 = torch.minimum(((cx + 0.5 * w) * width).clamp_min(0), width)
    y1 = torch.minimum(((cy + 0.5 * h) * height).clamp_min(0), height)
    return scores, labels, torch.stack([x0, y0, x1, y1], -1)


_SEGMENTATION = TaskExport(_keys("pred_logits", "pred_masks"), ("pred_logits", "pred_masks"))

TASK_EXPORTS: dict[str, TaskExport] = {
    "classification": TaskExport(lambda out: (out,), ("logits",), _softmax, ("probs",)),
    "detection": TaskExport(
        _keys("pred_logits", "pred_boxes"), ("pred_logits", "pred_boxes"),
        detection_topk, ("scores", "labels", "boxes"),
    ),
    "instance": _SEGMENTATION,
    "semantic": _SEGMENTATION,
    "panoptic": _SEGMENTATION,
}


def task_export(task: str) -> TaskExport:
    """The :class:`TaskExport` of ``task`` (ValueError when the task cannot be exported)."""
    if task not in TASK_EXPORTS:
        raise ValueError(f"cf export does not support the {task!r} task; "
                         f"supported: {', '.join(TASK_EXPORTS)}")
    return TASK_EXPORTS[task]


class ExportWrapper(nn.Module):
    """``images (B, 3, H, W) -> tuple`` of the task's named outputs (see module docstring)."""

    def __init__(self, model: nn.Module, spec: TaskExport, with_postprocess: bool) -> None:
        super().__init__()
        if with_postprocess and spec.postprocess is None:
            raise ValueError("--with-postprocess is not available for this task: its "
                             "post-processing cannot live in a graph; export the raw outputs")
        self.model = model
        self.spec = spec
        self.with_postprocess = with_postprocess

    def forward(self, images: Tensor) -> Outputs:
        raw = self.spec.raw(self.model(images))
        if self.with_postprocess and self.spec.postprocess is not None:
            return self.spec.postprocess(raw, images)
        return raw


class _ExportableAttention(nn.MultiheadAttention):
    """``nn.MultiheadAttention`` whose batch-first inputs are copied to sequence-first layout
    before the projections. Same parameters and maths; the stock module feeds transposed
    views to ``linear``, whose view-or-copy choice makes torch.export guard on ``B != 1``."""

    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Tensor | None = None,
                need_weights: bool = True, attn_mask: Tensor | None = None,
                average_attn_weights: bool = True, is_causal: bool = False) -> tuple[Tensor, Tensor | None]:
        if not (self.batch_first and query.dim() == 3 and self._qkv_same_embed_dim):
            return super().forward(query, key, value, key_padding_mask, need_weights, attn_mask,
                                   average_attn_weights, is_causal)
        q, k, v = (t.transpose(0, 1).clone(memory_format=torch.contiguous_format)
                   for t in (query, key, value))
        out, weights = F.multi_head_attention_forward(
            q, k, v, self.embed_dim, self.num_heads, self.in_proj_weight, self.in_proj_bias,
            self.bias_k, self.bias_v, self.add_zero_attn, self.dropout, self.out_proj.weight,
            self.out_proj.bias, training=self.training, key_padding_mask=key_padding_mask,
            need_weights=need_weights, attn_mask=attn_mask,
            average_attn_weights=average_attn_weights, is_causal=is_causal,
        )
        return out.transpose(0, 1), weights


def exportable_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` in eval mode with export-friendly attention modules (the
    original is untouched and stays the eager reference for the parity check)."""
    clone = copy.deepcopy(model).eval()
    for module in clone.modules():
        if type(module) is nn.MultiheadAttention:
            module.__class__ = _ExportableAttention
    return clone


def build_wrapper(model: nn.Module, task: str, with_postprocess: bool) -> ExportWrapper:
    """The graph module for ``task`` around an export-friendly copy of ``model``."""
    return ExportWrapper(exportable_copy(model), task_export(task), with_postprocess).eval()
