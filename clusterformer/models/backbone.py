"""The ClusterFormer backbone with a timm-like classification head.

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
from clusterformer.ops.images import IMAGENET_MEAN, IMAGENET_STD

HEAD_POOLS = ("last", "concat")


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
    """ClusterFormer backbone + classification head.

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
    ) -> None:
        super().__init__()
        if not (len(depths) == len(dims) == len(mlp_ratios) == 4):
            raise ValueError("depths, dims and mlp_ratios need exactly 4 entries (4 stages)")
        if head_pool not in HEAD_POOLS:
            raise ValueError(f"unknown head_pool {head_pool!r}; expected one of {HEAD_POOLS}")
        if not 0.0 <= drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate must be in [0, 1), got {drop_path_rate}")
        if len(center_grid) != 2:
            raise ValueError(f"center_grid must be (gh, gw), got {center_grid!r}")
        self.feature_channels: tuple[int, ...] = tuple(int(d) for d in dims)
        self.feature_strides: tuple[int, ...] = (4, 8, 16, 32)
        # The backbone contract (models/backbones.py), timm's convention.
        self.feature_info = [{"num_chs": c, "reduction": s, "module": f"stages.{i}"}
                             for i, (c, s) in enumerate(zip(self.feature_channels,
                                                            self.feature_strides, strict=True))]
        self.num_classes = int(num_classes)
        self.head_pool = head_pool
        self.in_chans = int(in_chans)
        self.default_cfg: dict[str, object] = {
            "mean": IMAGENET_MEAN, "std": IMAGENET_STD, "input_size": (in_chans, 224, 224),
            "crop_pct": 0.875, "interpolation": "bicubic", "num_classes": self.num_classes,
        }

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
                    num_iters=num_iters, center_update=center_update, dispatching=dispatching,
                    m_step=m_step, dispatch_hidden=max(int(dim * dispatch_mlp_ratio), 8),
                )
                for j in range(depth)
            ))
        # Activation checkpointing per stage (timm's set_grad_checkpointing): a runtime switch,
        # not part of the architecture or of checkpoints.
        self.grad_checkpointing = False
        self.num_features = dims[-1] if head_pool == "last" else sum(dims)
        self.head_norm = nn.LayerNorm(self.num_features)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes else nn.Identity()
        self.apply(_init_weights)

    def forward_features(
        self, images: Tensor, pixel_mask: Tensor | None = None, *, return_masks: bool = False
    ) -> list[Tensor] | tuple[list[Tensor], list[Tensor | None]]:
        """Four feature maps at strides 4/8/16/32.

        Args:
            images: ``(B, in_chans, H, W)`` float, any ``H, W >= 1``.
            pixel_mask: optional ``(B, H, W)`` bool, ``True`` = real pixel.
            return_masks: also return the per-stage token masks.

        Returns:
            ``[(B, C_i, ceil(H / s_i), ceil(W / s_i))]`` for ``s_i`` in 4, 8, 16, 32 (in
            channels-last memory), padded positions zeroed; with ``return_masks`` also ``[(B, H_i, W_i)]`` bool masks
            (``None`` entries when ``pixel_mask`` is ``None``: every token is real).
        """
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
        for i, (down, blocks) in enumerate(zip(self.downsamples, self.stages, strict=True)):
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
        return (features, masks) if return_masks else features

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each stage's activations during backward instead of keeping them: about
        a third more compute for a fraction of the activation memory (docs/benchmarks.md)."""
        self.grad_checkpointing = bool(enable)

    def forward_head(
        self, features: Sequence[Tensor], masks: Sequence[Tensor | None] | None = None,
        *, pre_logits: bool = False,
    ) -> Tensor:
        """Pooled, normalised features -> logits ``(B, num_classes)`` (or ``(B, F)``)."""
        masks = list(masks) if masks is not None else [None] * len(features)
        if self.head_pool == "last":
            pooled = masked_mean(features[-1], masks[-1])
        else:
            pooled = torch.cat([masked_mean(f, m) for f, m in zip(features, masks, strict=True)], 1)
        pooled = self.head_norm(pooled)
        return pooled if pre_logits else self.head(pooled)

    def forward(self, images: Tensor, pixel_mask: Tensor | None = None) -> Tensor:
        """``(B, in_chans, H, W)`` (+ optional ``(B, H, W)`` mask) -> ``(B, num_classes)``."""
        features, masks = self.forward_features(images, pixel_mask, return_masks=True)
        return self.forward_head(features, masks)


def _run_blocks(blocks: nn.ModuleList, x: Tensor, mask: Tensor | None) -> Tensor:
    for block in blocks:
        x = block(x, mask)
    return x


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, nn.Linear | nn.Conv2d):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
