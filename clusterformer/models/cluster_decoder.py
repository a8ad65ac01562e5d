"""The clustering transformer decoder: queries are cluster centers over the pixel decoder's maps.

Each layer (round-robin over the scales, coarsest first, as Mask2Former does)::

    C  = LN(C + [RCAC(pixels + pos, C + query_pos; T) - (C + query_pos)])   # recurrent clustering
    C  = LN(C + SelfAttn(C + query_pos, C + query_pos, C))                 # centers talk
    C  = LN(C + FFN(C))
    P  = LN(Dispatch(P, C))                                                 # pixels refined too

``RCAC`` is :func:`clusterformer.ops.recurrent_cross_attention_clustering` with the pixel
padding mask (padding never moves a center), ``Dispatch`` is the backbone's
(:class:`clusterformer.models.mixer.Dispatch`, ``"ours"`` = ``ops.feature_dispatching``).
Class and box heads run after every layer (deep supervision). Boxes are cxcywh in ``[0, 1]`` of
each image's *real* extent, predicted as ``sigmoid(delta + logit(reference))``; with iterative
refinement (default) every layer's boxes become the next layer's references.

M-step. The decoder defaults to ``m_step="mean"`` (soft k-means): the paper's literal sum grows
with the number of pixels, so a 1333-px COCO image and a 64-px test image would move centers by
amounts three orders of magnitude apart; the mean keeps updates on the scale of the values.
``m_step="sum"`` is available.

Query (center) initialisation, Table S1(f), ``query_init=``:

* ``"encoder"`` (the paper's "centers from encoder", default): every pixel token of the three
  scales is scored by an encoder class head; the top-``Q`` tokens become the initial centers
  (content = their projected features, reference box = a proposal at the token refined by an
  encoder box head) -- k-means seeded from data points. Padded tokens are never selected; when an
  image has fewer than ``Q`` real tokens the rest are identical blank centers.
* ``"free"``: learned content and learned reference boxes (DETR / DAB-DETR).
* ``"feature_embedding"``: direct feature embedding -- ``ops.init_centers`` adaptive pooling of
  the finest map onto a grid of ``Q`` cells, projected; references are the grid cells.
* ``"mixed"``: DINO's mixed query selection -- reference boxes from the encoder top-``Q``,
  content learned.

* ``"scene_adaptive"``: ClustSeg's scene-adaptive embedding (Liang, Zhou & Liu, ICML 2023 --
  the supplement's reference [7]; its "Dreamy-Start" initialises *thing* centers as
  ``FFN(PE(I))``, from the position-embedded features of the image itself, not from learned
  constants). ClustSeg gives no formula for turning the ``H W`` embedded pixels into ``Q``
  centers, and its released code does not contain this part, so here: an FFN scores every
  position-embedded pixel of the finest map for each of the ``Q`` centers, a softmax over the
  image's real pixels turns the scores into ``Q`` spatial pooling maps, and each center is
  its map's pooled embedded feature through a projection (LayerNorm). The reference point is
  the map's mean position (cx, cy), its extent twice the map's spread. ClustSeg's *stuff*
  centers (a class-wise memory bank of pixel embeddings, scene-agnostic) are not part of the
  Table S1f row and are not implemented.

Center-update variant ``"criss_cross"`` (Table S1c) in the decoder: centers have no grid
cell here, so each center's row and column are those of its reference point at the scale
the layer reads (CCNet's literal ``H + W - 1`` pixels), ANDed with a masked-attention mask.

``head_dim`` (Table S1d) sets the channels per head of the clustering's queries and keys
(``heads * head_dim`` wide) without changing the decoder width; ``None`` keeps
``hidden_dim / heads``.

``"encoder"`` and ``"mixed"`` also return ``enc_outputs`` (class logits and boxes of the
selected tokens), which the criterion supervises like a decoder layer (two-stage DETRs do).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from clusterformer.models.layers import drop_legacy_keys
from clusterformer.models.mixer import CENTER_UPDATES, Dispatch
from clusterformer.models.pixel_decoder import real_extent, sine_position_embedding
from clusterformer.ops import (
    ASSIGNMENTS_OVER_CENTERS,
    criss_cross_mask,
    init_centers,
    recurrent_cross_attention_clustering,
)
from clusterformer.ops.boxes import inverse_sigmoid

QUERY_INITS: tuple[str, ...] = ("encoder", "free", "feature_embedding", "mixed", "scene_adaptive")


class MLP(nn.Module):
    """``num_layers`` Linear layers with ReLU between: ``(..., in) -> (..., out)``."""

    def __init__(self, dim_in: int, hidden: int, dim_out: int, num_layers: int) -> None:
        super().__init__()
        dims = [dim_in] + [hidden] * (num_layers - 1) + [dim_out]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:], strict=True))

    def forward(self, x: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x) if i == len(self.layers) - 1 else F.relu(layer(x))
        return x


def box_sine_embedding(boxes: Tensor, dim: int, temperature: float = 10000.0) -> Tensor:
    """``(..., 4)`` cxcywh in ``[0, 1]`` -> ``(..., 4 * dim)`` sine features (DAB-DETR)."""
    freqs = temperature ** (2 * (torch.arange(dim, device=boxes.device) // 2) / dim)
    angles = boxes.unsqueeze(-1) * 2 * math.pi / freqs.to(boxes.dtype)
    emb = torch.stack([angles[..., 0::2].sin(), angles[..., 1::2].cos()], dim=-1).flatten(-2)
    return emb.flatten(-2)


class ClusterDecoderLayer(nn.Module):
    """One clustering layer: ``forward(centers, query_pos, pixels, pixel_pos, mask)``.

    Shapes: centers, query_pos ``(B, Q, D)``; pixels, pixel_pos ``(B, N, D)``; mask ``(B, N)``
    bool or ``None``. Returns new centers ``(B, Q, D)`` and pixels ``(B, N, D)`` (unchanged
    when the layer does not dispatch).
    """

    def __init__(
        self, dim: int, num_heads: int, ffn_dim: int, *, num_iters: int, m_step: str,
        center_update: str, dispatching: str, dispatch: bool, dropout: float = 0.0,
        head_dim: int | None = None,
    ) -> None:
        super().__init__()
        if center_update not in CENTER_UPDATES:
            raise ValueError(f"unknown center_update {center_update!r}; expected one of {tuple(CENTER_UPDATES)}")
        if head_dim is not None and head_dim < 1:
            raise ValueError(f"head_dim must be >= 1, got {head_dim}")
        self.num_heads, self.num_iters, self.m_step = num_heads, num_iters, m_step
        self.assignment = CENTER_UPDATES[center_update]
        qk_dim = dim if head_dim is None else num_heads * head_dim
        # No query bias where the assignment is over centers (see ClusteringMixer).
        query_bias = self.assignment not in ASSIGNMENTS_OVER_CENTERS
        self.q = nn.Linear(dim, qk_dim, bias=query_bias)
        self.k, self.v = nn.Linear(dim, qk_dim), nn.Linear(dim, dim)
        self.legacy_state_keys = () if query_bias else ("q.bias",)
        self.norm_cluster = nn.LayerNorm(dim)
        self.self_attn = nn.MultiheadAttention(dim, num_heads, dropout=dropout, batch_first=True)
        self.norm_self = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_dim), nn.ReLU(), nn.Dropout(dropout), nn.Linear(ffn_dim, dim))
        self.norm_ffn = nn.LayerNorm(dim)
        self.dispatch = Dispatch(dim, dispatching) if dispatch else None
        self.norm_pixels = nn.LayerNorm(dim) if dispatch else None
        self.dropout = nn.Dropout(dropout)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:  # noqa: ANN001
        drop_legacy_keys(self, state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(
        self, centers: Tensor, query_pos: Tensor, pixels: Tensor, pixel_pos: Tensor,
        mask: Tensor | None, attn_mask: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        params = {
            "q_weight": self.q.weight, "q_bias": self.q.bias, "k_weight": self.k.weight,
            "k_bias": self.k.bias, "v_weight": self.v.weight, "v_bias": self.v.bias,
        }
        start = centers + query_pos
        clustered = recurrent_cross_attention_clustering(
            pixels + pixel_pos, start, params, num_iters=self.num_iters,
            num_heads=self.num_heads, mask=mask, assignment=self.assignment, m_step=self.m_step,
            attn_mask=attn_mask,
        )
        centers = self.norm_cluster(centers + self.dropout(clustered - start))
        qk = centers + query_pos
        attended = self.self_attn(qk, qk, centers, need_weights=False)[0]
        centers = self.norm_self(centers + self.dropout(attended))
        centers = self.norm_ffn(centers + self.dropout(self.ffn(centers)))
        if self.dispatch is not None and self.norm_pixels is not None:
            pixels = self.norm_pixels(self.dispatch(pixels, centers))
            if mask is not None:
                pixels = pixels * mask.unsqueeze(-1).to(pixels.dtype)
        return centers, pixels


class ClusterDecoder(nn.Module):
    """Clustering decoder with class / box heads after every layer.

    ``forward(features, masks) -> dict`` with ``"pred_logits"`` ``(B, Q, C)``,
    ``"pred_boxes"`` ``(B, Q, 4)`` (cxcywh in ``[0, 1]`` of the real image), ``"aux_outputs"``
    (the same for layers ``0..L-2``), ``"enc_outputs"`` for encoder-based initialisations.

    Args:
        hidden_dim: ``D``, the pixel decoder's channels. num_classes: ``C``.
        num_queries: ``Q`` centers. num_layers: decoder layers. num_heads: attention heads.
        ffn_dim: FFN width. num_iters: ``T`` recurrent clustering iterations per layer.
        num_levels: scales given to ``forward`` (strides 8, 16, 32 -> 3).
        m_step, center_update, dispatching: clustering variants (see the module docstring and
            :mod:`clusterformer.models.mixer`).
        query_init: one of :data:`QUERY_INITS`.
        head_dim: channels per head of the clustering's queries and keys (Table S1d); ``None``
            means ``hidden_dim / num_heads``.
        iterative_refinement: each layer refines the previous layer's boxes.
        box_head: predict boxes (detection). Without it (mask classification) ``pred_boxes`` is
            left out and every layer keeps the initial reference boxes.
        no_object: the last of the ``num_classes`` logits is a softmax "no object" class;
            encoder query selection then ranks tokens by the other classes only.
        dispatch_all: dispatch in every layer. By default a layer dispatches only when a later
            layer reads its scale again, since other refined pixels would go unused (and their
            parameters would get no gradient) in detection.
    """

    def __init__(
        self, hidden_dim: int, num_classes: int, *, num_queries: int = 100, num_layers: int = 6,
        num_heads: int = 8, ffn_dim: int = 1024, num_iters: int = 3, num_levels: int = 3,
        m_step: str = "mean", center_update: str = "recurrent", dispatching: str = "ours",
        query_init: str = "encoder", iterative_refinement: bool = True, dispatch_all: bool = False,
        dropout: float = 0.0, box_head: bool = True, no_object: bool = False,
        head_dim: int | None = None,
    ) -> None:
        super().__init__()
        if query_init not in QUERY_INITS:
            raise ValueError(f"unknown query_init {query_init!r}; expected one of {QUERY_INITS}")
        if hidden_dim % 4:
            raise ValueError(f"hidden_dim must be divisible by 4, got {hidden_dim}")
        dim = hidden_dim
        self.num_queries, self.num_levels, self.query_init = num_queries, num_levels, query_init
        self.num_classes, self.iterative_refinement = num_classes, iterative_refinement
        self.criss_cross = center_update == "criss_cross"
        self.score_classes = num_classes - 1 if no_object else num_classes
        self.level_embed = nn.Parameter(torch.randn(num_levels, dim) * 0.02)
        self.layers = nn.ModuleList(
            ClusterDecoderLayer(
                dim, num_heads, ffn_dim, num_iters=num_iters, m_step=m_step,
                center_update=center_update, dispatching=dispatching, dropout=dropout,
                dispatch=dispatch_all or i + num_levels < num_layers, head_dim=head_dim,
            )
            for i in range(num_layers)
        )
        self.query_pos = MLP(2 * dim, dim, dim, 2)
        self.norm = nn.LayerNorm(dim)
        self.class_head = nn.Linear(dim, num_classes)
        self.box_head = MLP(dim, dim, 4, 3) if box_head else None
        if query_init in ("encoder", "mixed"):
            self.enc_proj = nn.Sequential(nn.Linear(dim, dim), nn.LayerNorm(dim))
            self.enc_class = nn.Linear(dim, num_classes)
            self.enc_box = MLP(dim, dim, 4, 3) if box_head else None
        if query_init in ("free", "mixed"):
            self.content = nn.Embedding(num_queries, dim)
        if query_init == "free":
            self.ref_logits = nn.Embedding(num_queries, 4)
        if query_init == "scene_adaptive":
            self.scene_scores = MLP(dim, dim, num_queries, 2)
            self.embed_proj = nn.Sequential(nn.Linear(dim, dim), nn.LayerNorm(dim))
        if query_init == "feature_embedding":
            self.embed_proj = nn.Sequential(nn.Linear(dim, dim), nn.LayerNorm(dim))
            self.grid = _grid_shape(num_queries)
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        prior = -math.log((1 - 0.01) / 0.01)  # focal-loss prior: every class starts at p = 0.01
        heads = [(self.class_head, self.box_head)]
        if self.query_init in ("encoder", "mixed"):
            heads.append((self.enc_class, self.enc_box))
        for cls, box in heads:
            nn.init.constant_(cls.bias, prior)
            if box is not None:
                nn.init.zeros_(box.layers[-1].weight)
                nn.init.zeros_(box.layers[-1].bias)
        if self.query_init == "free":
            with torch.no_grad():
                ref = torch.rand(self.num_queries, 4)
                ref[:, 2:] = 0.1
                self.ref_logits.weight.copy_(inverse_sigmoid(ref))

    def _select_from_encoder(
        self, pixels: Sequence[Tensor], masks: Sequence[Tensor | None], shapes: Sequence[tuple[int, int]],
    ) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """Top-``Q`` pixel tokens -> content ``(B, Q, D)``, reference boxes ``(B, Q, 4)``."""
        tokens = torch.cat(list(pixels), 1)
        batch, total, dim = tokens.shape
        proposals, valids = [], []
        for level, ((height, width), mask) in enumerate(zip(shapes, masks, strict=True)):
            extent = real_extent(mask, batch, height, width, tokens)
            ys = (torch.arange(height, dtype=tokens.dtype, device=tokens.device) + 0.5).view(1, -1, 1)
            xs = (torch.arange(width, dtype=tokens.dtype, device=tokens.device) + 0.5).view(1, 1, -1)
            cy = (ys / extent[:, 0].view(-1, 1, 1)).expand(batch, height, width)
            cx = (xs / extent[:, 1].view(-1, 1, 1)).expand(batch, height, width)
            wh = torch.full_like(cx, 0.05 * 2.0**level)
            proposals.append(torch.stack([cx, cy, wh, wh], -1).flatten(1, 2))
            valids.append(torch.ones(batch, height * width, dtype=torch.bool, device=tokens.device)
                          if mask is None else mask.flatten(1))
        proposal, valid = torch.cat(proposals, 1), torch.cat(valids, 1)
        valid = valid & (proposal[..., :2] < 1).all(-1)
        memory = self.enc_proj(tokens) * valid.unsqueeze(-1).to(tokens.dtype)
        logits = self.enc_class(memory)
        boxes = proposal if self.enc_box is None else (
            self.enc_box(memory) + inverse_sigmoid(proposal)).sigmoid()
        scores = logits[..., : self.score_classes].max(-1).values.masked_fill(~valid, float("-inf"))
        # Pad with Q blank, never-preferred entries so top-Q exists even with fewer tokens than
        # queries. Unconditionally: a branch on the token count would make torch.export
        # specialise the graph to one side of it (the picks are the same either way).
        short = self.num_queries
        memory = F.pad(memory, (0, 0, 0, short))
        logits, boxes = F.pad(logits, (0, 0, 0, short)), F.pad(boxes, (0, 0, 0, short))
        scores = F.pad(scores, (0, short), value=float("-inf"))
        valid = F.pad(valid, (0, short), value=False)
        index = scores.topk(self.num_queries, dim=1).indices  # (B, Q)
        keep = valid.gather(1, index).unsqueeze(-1)

        def pick(x: Tensor) -> Tensor:
            return x.gather(1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))

        blank_box = torch.tensor([0.5, 0.5, 1.0, 1.0], dtype=boxes.dtype, device=boxes.device)
        sel_boxes = torch.where(keep, pick(boxes), blank_box)
        sel_logits = torch.where(keep, pick(logits), torch.full_like(logits[:, :1], -20.0))
        content = pick(memory) * keep.to(memory.dtype)
        enc = {"pred_logits": sel_logits} if self.enc_box is None else {
            "pred_logits": sel_logits, "pred_boxes": sel_boxes}
        return content, sel_boxes, enc

    def _scene_adaptive(
        self, embedded: Tensor, mask: Tensor | None, shape: tuple[int, int],
    ) -> tuple[Tensor, Tensor]:
        """ClustSeg's scene-adaptive centers from the finest map's position-embedded pixels
        ``(B, N, D)`` (see the module docstring) -> content ``(B, Q, D)``, references ``(B, Q, 4)``."""
        batch, height, width = embedded.shape[0], *shape
        scores = self.scene_scores(embedded)  # (B, N, Q)
        if mask is not None:
            scores = scores.masked_fill(~mask.flatten(1).unsqueeze(-1), torch.finfo(scores.dtype).min)
        pooling = torch.softmax(scores, dim=1).transpose(1, 2)  # (B, Q, N): each sums to 1
        content = self.embed_proj(pooling @ embedded)
        extent = real_extent(mask, batch, height, width, embedded)
        ys = (torch.arange(height, dtype=embedded.dtype, device=embedded.device) + 0.5).view(1, -1, 1)
        xs = (torch.arange(width, dtype=embedded.dtype, device=embedded.device) + 0.5).view(1, 1, -1)
        cy = (ys / extent[:, 0].view(-1, 1, 1)).expand(batch, height, width)
        cx = (xs / extent[:, 1].view(-1, 1, 1)).expand(batch, height, width)
        position = torch.stack([cx, cy], -1).flatten(1, 2)  # (B, N, 2)
        mean = pooling @ position
        spread = (pooling @ position.square() - mean.square()).clamp_min(0.0).sqrt()
        ref = torch.cat([mean.clamp(0.0, 1.0), (2 * spread).clamp(0.01, 1.0)], -1)
        return content, ref

    def _initial_queries(
        self, pixels: Sequence[Tensor], masks: Sequence[Tensor | None], shapes: Sequence[tuple[int, int]],
        pixel_pos: Sequence[Tensor],
    ) -> tuple[Tensor, Tensor, dict[str, Tensor] | None]:
        batch, dim = pixels[0].shape[0], pixels[0].shape[-1]
        if self.query_init == "scene_adaptive":
            content, ref = self._scene_adaptive(pixels[0] + pixel_pos[0], masks[0], shapes[0])
            return content, ref.detach(), None
        if self.query_init in ("encoder", "mixed"):
            content, ref, enc = self._select_from_encoder(pixels, masks, shapes)
            if self.query_init == "mixed":
                content = self.content.weight.unsqueeze(0).expand(batch, -1, -1)
            return content, ref.detach(), enc
        if self.query_init == "free":
            content = self.content.weight.unsqueeze(0).expand(batch, -1, -1)
            ref = self.ref_logits.weight.sigmoid().unsqueeze(0).expand(batch, -1, -1)
            return content, ref, None
        height, width = shapes[0]
        finest = pixels[0].transpose(1, 2).reshape(batch, dim, height, width)
        content = self.embed_proj(init_centers(finest, self.grid, mask=masks[0]))
        gh, gw = self.grid
        ys = (torch.arange(gh, dtype=finest.dtype, device=finest.device) + 0.5) / gh
        xs = (torch.arange(gw, dtype=finest.dtype, device=finest.device) + 0.5) / gw
        cy, cx = torch.meshgrid(ys, xs, indexing="ij")
        ref = torch.stack([cx, cy, torch.full_like(cx, 1 / gw), torch.full_like(cy, 1 / gh)], -1)
        return content, ref.reshape(1, -1, 4).expand(batch, -1, -1), None

    def _heads(self, centers: Tensor, ref: Tensor) -> dict[str, Tensor]:
        hidden = self.norm(centers)
        if self.box_head is None:
            return {"pred_logits": self.class_head(hidden)}
        boxes = (self.box_head(hidden) + inverse_sigmoid(ref)).sigmoid()
        return {"pred_logits": self.class_head(hidden), "pred_boxes": boxes}

    def forward(
        self, features: Sequence[Tensor], masks: Sequence[Tensor | None],
        layer_hook: Callable[[Tensor, tuple[int, int] | None], Tensor | None] | None = None,
    ) -> dict:
        """features: ``[(B, D, h_l, w_l)]`` at strides 8, 16, 32; masks: matching ``(B, h_l, w_l)``.

        ``layer_hook(hidden (B, Q, D), next_shape)`` (segmentation heads) is called with the
        normalised initial centers and after every layer; ``next_shape`` is the ``(h, w)`` of the
        scale the next layer reads (``None`` after the last). It may return a ``(B, Q, h * w)``
        bool attention mask (True = the center may see the pixel) for that next layer."""
        if len(features) != self.num_levels:
            raise ValueError(f"expected {self.num_levels} feature maps, got {len(features)}")
        dim = features[0].shape[1]
        shapes = [(f.shape[-2], f.shape[-1]) for f in features]
        pixels = [f.flatten(2).transpose(1, 2) for f in features]
        pixel_pos = [
            (sine_position_embedding(m, (f.shape[0], *f.shape[-2:]), dim, like=f)
             + self.level_embed[i].view(1, -1, 1, 1)).flatten(2).transpose(1, 2)
            for i, (f, m) in enumerate(zip(features, masks, strict=True))
        ]
        flat_masks = [None if m is None else m.flatten(1) for m in masks]
        centers, ref, enc = self._initial_queries(pixels, masks, shapes, pixel_pos)
        outputs: list[dict[str, Tensor]] = []
        query_pos = self.query_pos(box_sine_embedding(ref, dim // 2))

        def level_of(i: int) -> int:
            return self.num_levels - 1 - i % self.num_levels  # coarsest scale first

        attn_mask = None if layer_hook is None else layer_hook(self.norm(centers), shapes[level_of(0)])
        for i, layer in enumerate(self.layers):
            level = level_of(i)
            layer_mask = attn_mask
            if self.criss_cross:
                cross = _criss_cross_at(ref, masks[level], shapes[level])
                layer_mask = cross if attn_mask is None else attn_mask & cross
            centers, pixels[level] = layer(
                centers, query_pos, pixels[level], pixel_pos[level], flat_masks[level], layer_mask
            )
            outputs.append(self._heads(centers, ref))
            if layer_hook is not None:
                last = i + 1 == len(self.layers)
                attn_mask = layer_hook(self.norm(centers), None if last else shapes[level_of(i + 1)])
            if self.box_head is not None and self.iterative_refinement and i + 1 < len(self.layers):
                ref = outputs[-1]["pred_boxes"].detach()
                query_pos = self.query_pos(box_sine_embedding(ref, dim // 2))
        result: dict = {**outputs[-1], "aux_outputs": outputs[:-1]}
        if enc is not None:
            result["enc_outputs"] = enc
        return result


def _criss_cross_at(ref: Tensor, mask: Tensor | None, shape: tuple[int, int]) -> Tensor:
    """``(B, Q, h * w)`` bool: the row and the column of each reference point ``ref (B, Q, 4)``
    (cxcywh in ``[0, 1]`` of each image's real extent) on an ``(h, w)`` map, padding excluded."""
    height, width = shape
    extent = real_extent(mask, ref.shape[0], height, width, ref)
    rows = (ref[..., 1] * extent[:, :1]).floor().long().clamp(0, height - 1)
    cols = (ref[..., 0] * extent[:, 1:]).floor().long().clamp(0, width - 1)
    # A point on the real edge (cy = 1) would fall one row past the image: keep it inside.
    rows = torch.minimum(rows, extent[:, :1].long() - 1)
    cols = torch.minimum(cols, extent[:, 1:].long() - 1)
    return criss_cross_mask(rows, rows + 1, cols, cols + 1, shape)


def _grid_shape(num: int) -> tuple[int, int]:
    """The most square ``(gh, gw)`` with ``gh * gw == num``."""
    gh = max(d for d in range(1, int(math.isqrt(num)) + 1) if num % d == 0)
    return gh, num // gh
