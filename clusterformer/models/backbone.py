"""The ClusterFormer backbone with a classification head, as a timm model (timm's model API;
``clusterformer.timm`` registers the presets with timm) and as the dense heads' backbone
(``forward_pyramid``).

Layout: a 4x4/4 stem conv over RGB plus two coordinate channels, four stages of
:class:`ClusterBlock` with 3x3/2 conv downsampling between them, features at strides
4/8/16/32 (ceil division). Each block is::

    x = x + drop_path(ls1 * mixer(GN(x)))     # windowed clustering, see models/mixer.py
    x = x + drop_path(ls2 * MLP(GN(x)))       # pointwise, hidden = mlp_ratio * C

with ``GN = GroupNorm(1, C)`` computed over real positions only.

Window choice. The official code fixes a number of windows per side with 100 centers per
window, which crashes at 224 and yields more centers than tokens in late stages. Here a
window is a fixed ``window_size x window_size`` = 7x7 tokens with a 3x3 center grid (9
centers for 49 tokens) at every stage: at 224 the stages see 8x8, 4x4, 2x2 and 1x1 windows
(stage 4, 7x7 tokens, is exactly one window). Maps are padded to whole windows with a mask,
so any size works (33x47 and even 17x23 run; tiny maps are one mostly padded window).

Padding. ``pixel_mask`` (B, H, W), True = real pixel, is downsampled per stage with
``any`` (max) pooling and honoured everywhere: coordinates are normalised by each image's
real extent, padded pixels are zeroed before the stem and before every downsampling conv,
GroupNorm statistics, window centers, clustering and the pooled head ignore padding. An image
zero-padded at the bottom/right therefore gives the same features on its real part as the
unpadded image (tested).

Sizes (1000-class head, one 224x224 image; GFLOPs = matmul + conv FLOPs, 2 per multiply-add,
as ``torch.utils.flop_counter`` counts them): nano 1.93 M params / 0.52 GFLOPs, tiny 31.5 M /
11.1 GFLOPs, small 53.2 M / 19.4 GFLOPs (``cf models`` prints the current values). Most of
tiny's cost is the ratio-8 MLPs of stages 1-2; the mixer's q/k/v/out projections plus the
dispatching MLP (hidden ``dim / 8``) add ``~4.25 C^2`` parameters per block.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from clusterformer.models.layers import (
    DropPath,
    MaskedGroupNorm,
    TokenMlp,
    coordinate_channels,
    downsample_mask,
    masked_mean,
    static_sizes,
    zero_padding,
)
from clusterformer.models.mixer import ClusteringMixer
from clusterformer.models.timm_conventions import default_cfg, feature_take_indices

HEAD_POOLS = ("last", "concat")
GLOBAL_POOLS = ("avg", "")


class ClusterBlock(nn.Module):
    """One pre-norm block: clustering mixer then MLP, each with layer scale and drop path.

    ``forward(x (B, H, W, C), mask (B, H, W) | None) -> (B, H, W, C)``: channels-last, so
    the MLP and the mixer's projections are plain Linear layers.
    """

    def __init__(
        self,
        dim: int,
        *,
        mlp_ratio: float,
        drop_path: float = 0.0,
        layer_scale_init: float = 1e-5,
        **mixer_options: object,
    ) -> None:
        super().__init__()
        self.norm1 = MaskedGroupNorm(dim)
        self.mixer = ClusteringMixer(dim, **mixer_options)  # type: ignore[arg-type]
        self.norm2 = MaskedGroupNorm(dim)
        self.mlp = TokenMlp(dim, int(dim * mlp_ratio))
        self.ls1 = nn.Parameter(torch.full((dim,), float(layer_scale_init)))
        self.ls2 = nn.Parameter(torch.full((dim,), float(layer_scale_init)))
        self.drop_path = DropPath(drop_path)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        x = self._residual(x, self.mixer(self.norm1(x, mask), mask), self.ls1)
        return self._residual(x, self.mlp(self.norm2(x, mask)), self.ls2)

    def _residual(self, x: Tensor, branch: Tensor, scale: Tensor) -> Tensor:
        """``x + drop_path(scale * branch)``; one fused pass when no path is dropped."""
        if self.training and self.drop_path.rate > 0:
            return x + self.drop_path(scale * branch)
        return torch.addcmul(x, branch, scale)


class ClusterFormer(nn.Module):
    """ClusterFormer backbone + classification head, with two faces.

    * timm's model API (``clusterformer.timm`` registers the presets with timm):
      ``forward_features(x)`` is the stage-4 map ``(B, C_4, ceil(H / 32), ceil(W / 32))``,
      ``forward_head(x, pre_logits=False)`` pools and classifies it, ``forward`` is both;
      ``reset_classifier``, ``get_classifier``, ``forward_intermediates``,
      ``prune_intermediate_layers``, ``set_grad_checkpointing``, ``group_matcher``.
    * the backbone contract of the dense heads (models/backbones.py): ``forward_pyramid``
      gives the four maps at strides 4-32 and their token masks.

    Args:
        depths, dims, mlp_ratios: per-stage block count, width and MLP expansion.
        head_dim: channels per clustering head (``num_heads = dim // head_dim``).
        window_size: window side in tokens; center_grid: ``(gh, gw)`` centers per window.
        num_iters: ``T`` recurrent clustering iterations.
        center_update: ``"recurrent" | "vanilla_attention" | "kmeans" | "cosine"``.
        dispatching: ``"ours" | "none" | "fc" | "confidence" | "fc_similarity"``.
        m_step: ``"sum"`` (paper) or ``"mean"`` (soft k-means).
        dispatch_mlp_ratio: hidden width of the dispatching MLP relative to ``dim``.
        drop_path_rate: stochastic depth of the last block (linear from 0).
        layer_scale_init: initial value of the per-channel layer scales.
        num_classes: classifier outputs; ``0`` makes ``forward`` return pooled features.
        head_pool: ``"last"`` (pool stage 4) or ``"concat"`` (pool all four stages, concat).
        in_chans: image channels (two coordinate channels are added to them).
        global_pool: ``"avg"`` (mean over real positions) or ``""``: no pooling, the head
            runs at every position of the stage-4 map and ``forward`` gives a map
            (``head_pool="last"`` only).
        drop_rate: dropout before the classifier.
        device, dtype: where and in which dtype the parameters are created (timm's factory
            arguments; ``device="meta"`` allocates nothing).
    """

    # The backbone contract (models/backbones.py): modules of the classifier, not the features;
    # loading backbone weights (--pretrained, --backbone-weights) leaves them alone.
    classifier_modules: tuple[str, ...] = ("head_norm", "head")

    def __init__(
        self,
        *,
        depths: Sequence[int] = (2, 2, 6, 2),
        dims: Sequence[int] = (96, 192, 384, 768),
        mlp_ratios: Sequence[float] = (8, 8, 4, 4),
        head_dim: int = 32,
        window_size: int = 7,
        center_grid: Sequence[int] = (3, 3),
        num_iters: int = 3,
        center_update: str = "recurrent",
        dispatching: str = "ours",
        m_step: str = "sum",
        dispatch_mlp_ratio: float = 0.125,
        drop_path_rate: float = 0.0,
        layer_scale_init: float = 1e-5,
        num_classes: int = 1000,
        head_pool: str = "last",
        in_chans: int = 3,
        global_pool: str = "avg",
        drop_rate: float = 0.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if not (len(depths) == len(dims) == len(mlp_ratios) == 4):
            raise ValueError("depths, dims and mlp_ratios need exactly 4 entries (4 stages)")
        if head_pool not in HEAD_POOLS:
            raise ValueError(f"unknown head_pool {head_pool!r}; expected one of {HEAD_POOLS}")
        if not 0.0 <= drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate must be in [0, 1), got {drop_path_rate}")
        if not 0.0 <= drop_rate < 1.0:
            raise ValueError(f"drop_rate must be in [0, 1), got {drop_rate}")
        if len(center_grid) != 2:
            raise ValueError(f"center_grid must be (gh, gw), got {center_grid!r}")
        self.head_pool = head_pool
        self.global_pool = _checked_pool(global_pool, head_pool)
        self.feature_channels: tuple[int, ...] = tuple(int(d) for d in dims)
        self.feature_strides: tuple[int, ...] = (4, 8, 16, 32)
        # The backbone contract (models/backbones.py), timm's convention.
        self.feature_info = [{"num_chs": c, "reduction": s, "module": f"stages.{i}"}
                             for i, (c, s) in enumerate(zip(self.feature_channels,
                                                            self.feature_strides, strict=True))]
        self.num_classes = int(num_classes)
        self.in_chans = int(in_chans)
        self.default_cfg: dict[str, Any] = default_cfg(self.in_chans, self.num_classes)
        # timm's names: num_features are the channels of forward_features' map,
        # head_hidden_size the width of the pooled features the classifier reads.
        self.num_features = int(dims[-1])
        self.head_hidden_size = int(dims[-1]) if head_pool == "last" else int(sum(dims))
        # Activation checkpointing per stage (timm's set_grad_checkpointing): a runtime switch,
        # not part of the architecture or of checkpoints.
        self.grad_checkpointing = False

        # Every tensor is created on `device` (the meta device allocates nothing), then cast.
        with torch.device(device) if device is not None else nullcontext():
            self.stem = nn.Conv2d(in_chans + 2, dims[0], kernel_size=4, stride=4)
            total = sum(depths)
            rates = [drop_path_rate * i / max(total - 1, 1) for i in range(total)]
            self.downsamples = nn.ModuleList()
            self.stages = nn.ModuleList()
            for i, (depth, dim, ratio) in enumerate(zip(depths, dims, mlp_ratios, strict=True)):
                down = nn.Identity() if i == 0 else nn.Conv2d(dims[i - 1], dim, 3, 2, 1)
                self.downsamples.append(down)
                first = sum(depths[:i])
                self.stages.append(nn.ModuleList(
                    ClusterBlock(
                        dim, mlp_ratio=ratio, drop_path=rates[first + j],
                        layer_scale_init=layer_scale_init, head_dim=head_dim,
                        window_size=window_size, center_grid=tuple(center_grid),
                        num_iters=num_iters, center_update=center_update,
                        dispatching=dispatching, m_step=m_step,
                        dispatch_hidden=max(int(dim * dispatch_mlp_ratio), 8),
                    )
                    for j in range(depth)
                ))
            self.head_norm = nn.LayerNorm(self.head_hidden_size)
            self.head_drop = nn.Dropout(drop_rate)
            self.head = (nn.Linear(self.head_hidden_size, num_classes) if num_classes
                         else nn.Identity())  # fmt: skip
            self.apply(_init_weights)
        if dtype is not None:
            self.to(dtype=dtype)

    # -- the backbone contract of the dense heads --------------------------------------------

    def forward_pyramid(
        self, images: Tensor, pixel_mask: Tensor | None = None
    ) -> tuple[list[Tensor], list[Tensor | None]]:
        """Four feature maps at strides 4/8/16/32 and their token masks.

        Args:
            images: ``(B, in_chans, H, W)`` float, any ``H, W >= 1``.
            pixel_mask: optional ``(B, H, W)`` bool, ``True`` = real pixel.

        Returns:
            ``[(B, C_i, ceil(H / s_i), ceil(W / s_i))]`` for ``s_i`` in 4, 8, 16, 32 (in
            channels-last memory), padded positions zeroed, and their ``[(B, H_i, W_i)]`` bool
            masks (``None`` entries when ``pixel_mask`` is ``None``: every token is real).
            A model pruned by :meth:`prune_intermediate_layers` gives its first stages only.
        """
        return self._run_stages(images, pixel_mask, len(self.stages))

    def _run_stages(
        self, images: Tensor, pixel_mask: Tensor | None, count: int
    ) -> tuple[list[Tensor], list[Tensor | None]]:
        """The maps and masks of the first ``count`` stages (:meth:`forward_pyramid`)."""
        _, _, height, width = images.shape
        x = torch.cat([images, coordinate_channels(images, pixel_mask)], dim=1)
        mask = pixel_mask
        if mask is not None:
            x = zero_padding(x, mask)
        # Unconditional (a zero-width pad is a no-op): branching on the size would make
        # torch.export specialise the graph to one residue of H and W modulo 4. Ceil division
        # of non-negative operands only: ONNX integer division truncates towards zero.
        x = F.pad(x, (0, (width + 3) // 4 * 4 - width, 0, (height + 3) // 4 * 4 - height))
        # Channels-last from the stem on: the convs then write (B, H, W, C) memory, so the
        # blocks' (B, H, W, C) view of a conv output is free and stays contiguous. Symbolic
        # sizes (torch.export) keep the default layout: strides would add guards.
        channels_last = static_sizes(x)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        x = self.stem(x)
        mask = downsample_mask(mask, 4)
        features: list[Tensor] = []
        masks: list[Tensor | None] = []
        for i, (down, blocks) in enumerate(zip(self.downsamples[:count], self.stages[:count],
                                               strict=True)):  # fmt: skip
            if i > 0:
                x = down(zero_padding(x, mask))
                mask = downsample_mask(mask, 2)
            x = x.permute(0, 2, 3, 1)
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                # Keep only the stage's input; its blocks run again during backward.
                x = checkpoint(_run_blocks, blocks, x, mask, use_reentrant=False)
            else:
                x = _run_blocks(blocks, x, mask)
            # (B, C, H, W) in channels-last memory: the next downsampling conv reads it as is.
            x = x.permute(0, 3, 1, 2)
            x = zero_padding(x if channels_last else x.contiguous(), mask)
            features.append(x)
            masks.append(mask)
        return features, masks

    # -- timm's model API ----------------------------------------------------------------------

    def forward_features(self, x: Tensor) -> Tensor:
        """``(B, in_chans, H, W) -> (B, num_features, ceil(H / 32), ceil(W / 32))``: the last
        stage's map, unpooled (a pruned model's last kept stage)."""
        return self.forward_pyramid(x)[0][-1]

    def forward_head(self, x: Tensor | Sequence[Tensor], pre_logits: bool = False) -> Tensor:
        """Pooled, normalised features -> logits ``(B, num_classes)`` (``pre_logits``:
        ``(B, head_hidden_size)``); with ``global_pool=""`` per position, ``(B, K, h, w)``.

        ``x`` is :meth:`forward_features`' map, or for ``head_pool="concat"`` the list of
        maps of :meth:`forward_pyramid` (that head pools every stage).
        """
        maps = [x] if isinstance(x, Tensor) else list(x)
        return self._head(maps, [None] * len(maps), pre_logits)

    def _head(
        self, maps: Sequence[Tensor], masks: Sequence[Tensor | None], pre_logits: bool
    ) -> Tensor:
        if self.global_pool == "":
            x = self.head_drop(self.head_norm(maps[-1].permute(0, 2, 3, 1)))
            x = x if pre_logits else self.head(x)
            return zero_padding(x.permute(0, 3, 1, 2), masks[-1])
        if self.head_pool == "last":
            pooled = masked_mean(maps[-1], masks[-1])
        elif len(maps) == len(self.feature_info):
            pooled = torch.cat([masked_mean(f, m) for f, m in zip(maps, masks, strict=True)], 1)
        else:
            raise ValueError(f"head_pool='concat' pools all {len(self.feature_info)} stages; "
                             "pass forward_head the maps of forward_pyramid")  # fmt: skip
        pooled = self.head_drop(self.head_norm(pooled))
        return pooled if pre_logits else self.head(pooled)

    def forward(self, images: Tensor, pixel_mask: Tensor | None = None) -> Tensor:
        """``(B, in_chans, H, W)`` (+ optional ``(B, H, W)`` mask) -> ``(B, num_classes)``."""
        return self._head(*self.forward_pyramid(images, pixel_mask), pre_logits=False)

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """A new, freshly initialised classifier with ``num_classes`` outputs (0: none), on the
        model's device and dtype; ``global_pool`` ``"avg"`` or ``""`` (None keeps it)."""
        if global_pool is not None:
            self.global_pool = _checked_pool(global_pool, self.head_pool)
        self.num_classes = int(num_classes)
        self.default_cfg = {**self.default_cfg, "num_classes": self.num_classes}
        weight = self.stem.weight
        if self.num_classes:
            self.head = nn.Linear(self.head_hidden_size, self.num_classes,
                                  device=weight.device, dtype=weight.dtype)  # fmt: skip
            _init_weights(self.head)
        else:
            self.head = nn.Identity()
        self.head.train(self.training)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each stage's activations during backward instead of keeping them: about
        a third more compute for a fraction of the activation memory (docs/benchmarks.md)."""
        self.grad_checkpointing = bool(enable)

    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """Parameter groups for timm's layer-wise learning-rate decay: the stem, then each stage
        (coarse) or each block with the stage's downsampling conv ahead of its first block."""
        if coarse:
            return {"stem": r"^stem", "blocks": r"^(?:stages|downsamples)\.(\d+)"}
        return {"stem": r"^stem",
                "blocks": [(r"^stages\.(\d+)\.(\d+)", None), (r"^downsamples\.(\d+)", (0,))]}

    def forward_intermediates(
        self,
        x: Tensor,
        indices: int | Sequence[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[Tensor] | tuple[Tensor, list[Tensor]]:
        """timm's intermediate features: the maps of the stages ``indices`` picks (None: all,
        an int ``n``: the last ``n``, a list: those), NCHW at strides 4/8/16/32.

        ``norm`` changes nothing: the stages' maps are the model's features (its only norm
        outside the blocks, ``head_norm``, is the classifier's, applied to pooled features).
        ``stop_early`` runs no stage after the last one picked. Returns the maps, or
        (the last map computed, the maps) unless ``intermediates_only``.
        """
        if output_fmt != "NCHW":
            raise ValueError(f"output_fmt {output_fmt!r}: ClusterFormer gives NCHW maps only")
        take, last = feature_take_indices(len(self.stages), indices)
        count = last + 1 if stop_early else len(self.stages)
        maps, _ = self._run_stages(x, None, count)
        intermediates = [maps[i] for i in take]
        return intermediates if intermediates_only else (maps[-1], intermediates)

    def prune_intermediate_layers(
        self, indices: int | Sequence[int] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        """Drop the stages after the last one ``indices`` picks (as :meth:`forward_intermediates`
        reads them) and, with ``prune_head`` or when stages were dropped, the classifier and
        its norm (``forward`` then gives the last kept map). ``prune_norm`` has nothing to
        prune (see ``norm`` there). Returns the stage indices picked."""
        take, last = feature_take_indices(len(self.stages), indices)
        prune_end = last < len(self.stages) - 1
        self.stages = self.stages[: last + 1]
        self.downsamples = self.downsamples[: last + 1]
        self.feature_info = self.feature_info[: last + 1]
        self.feature_channels = self.feature_channels[: last + 1]
        self.feature_strides = self.feature_strides[: last + 1]
        if prune_end:
            # The head was sized for the final stage: the features now end at the last tap.
            self.num_features = self.head_hidden_size = self.feature_channels[-1]
            self.head_pool = "last"
        if prune_head or prune_end:
            self.head_pool = "last"
            self.head_hidden_size = self.num_features
            self.head_norm = nn.Identity()
            self.reset_classifier(0, "")
        return take


def _checked_pool(global_pool: str, head_pool: str) -> str:
    if global_pool not in GLOBAL_POOLS:
        raise ValueError(f"unknown global_pool {global_pool!r}; expected 'avg' or '' (none)")
    if global_pool == "" and head_pool != "last":
        raise ValueError("global_pool='' (no pooling) needs head_pool='last': the concat head "
                         "pools maps of different sizes")  # fmt: skip
    return global_pool


def _run_blocks(blocks: nn.ModuleList, x: Tensor, mask: Tensor | None) -> Tensor:
    for block in blocks:
        x = block(x, mask)
    return x


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, nn.Linear | nn.Conv2d):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
