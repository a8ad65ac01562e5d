"""What an exported graph computes: the model wrapped to a tuple of named tensors.

Every task says it in its spec (:class:`clusterformer.tasks.ExportHeads`): which of the
model's outputs are the raw head outputs (auxiliary and encoder outputs are dropped) and, where
the task's post-processing fits in a graph, that post-processing. The built-in tasks' outputs
(README, "Export and deployment"): classification ``logits`` (``probs`` post-processed);
detection ``pred_logits``, ``pred_boxes`` (``scores``, ``labels``, ``boxes``: the top 100);
instance / semantic / panoptic ``pred_logits``, ``pred_masks`` (no in-graph post-processing:
their merges are data-dependent loops).

Graph input: ``images`` float32 ``(B, 3, H, W)``, RGB scaled to ``[0, 1]`` and normalised with
the checkpoint's mean/std, no padding mask (every pixel is real).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from clusterformer.tasks import ExportHeads

Outputs = tuple[Tensor, ...]


class ExportWrapper(nn.Module):
    """``images (B, 3, H, W) -> tuple`` of the task's named outputs (see module docstring)."""

    def __init__(self, model: nn.Module, heads: ExportHeads, with_postprocess: bool) -> None:
        super().__init__()
        if with_postprocess and heads.postprocess is None:
            raise ValueError("--with-postprocess is not available for this task: its "
                             "post-processing cannot live in a graph; export the raw outputs")
        self.model = model
        self.heads = heads
        self.with_postprocess = with_postprocess

    def forward(self, images: Tensor) -> Outputs:
        raw = self.heads.raw(self.model(images))
        if self.with_postprocess and self.heads.postprocess is not None:
            return self.heads.postprocess(raw, images)
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


def build_wrapper(model: nn.Module, heads: ExportHeads, with_postprocess: bool) -> ExportWrapper:
    """The graph module for a task's ``heads`` around an export-friendly copy of ``model``."""
    return ExportWrapper(exportable_copy(model), heads, with_postprocess).eval()
