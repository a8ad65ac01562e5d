"""Multi-scale pixel decoders over the backbone's four maps (strides 4/8/16/32).

Both decoders return the same :class:`PixelDecoderOutput`: ``hidden_dim``-channel maps at
strides 8, 16 and 32 (what the clustering decoder attends to, round-robin) with their token
masks, and optionally a stride-4 ``mask_features`` map for the segmentation heads.

* ``"fpn"`` (default): lateral 1x1 convs, a nearest-neighbour top-down path and 3x3 output
  convs with masked GroupNorm. It is the default because it is the cheapest on a CPU (a few
  convs), compiles trivially, and is *exactly* invariant to zero padding: padded tokens are
  zeroed before every conv, GroupNorm statistics skip them, and upsampling by repetition maps
  every real token onto a real token.
* ``"msdeform"``: Deformable-DETR's multi-scale deformable attention encoder, written in plain
  PyTorch with ``F.grid_sample`` (no custom CUDA op, so it runs on CPU, compiles and exports).
  Each token samples ``num_points`` locations per scale and head around its reference point.
  Reference points and offsets are in the *real* (unpadded) extent of every map, and value
  maps are zero at padding, so padding only changes what the zero border already gives.
  More accurate at scale (Mask2Former's choice), several times the FPN's cost.

Masks are ``(B, h, w)`` bool, ``True`` = real token, or ``None`` (every token is real).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from clusterformer.models.layers import zero_padding

PIXEL_DECODERS: tuple[str, ...] = ("fpn", "msdeform")


@dataclass
class PixelDecoderOutput:
    """features: ``[(B, D, h_s, w_s)]`` for strides 8, 16, 32; masks: matching ``(B, h_s, w_s)``
    bool or ``None``; mask_features: ``(B, D, h_4, w_4)`` or ``None``; mask_features_mask:
    its ``(B, h_4, w_4)`` mask or ``None``."""

    features: list[Tensor]
    masks: list[Tensor | None]
    mask_features: Tensor | None = None
    mask_features_mask: Tensor | None = None


def real_extent(mask: Tensor | None, batch: int, height: int, width: int, like: Tensor) -> Tensor:
    """Real ``(h, w)`` of each image's top-left region in tokens -> ``(B, 2)`` float."""
    if mask is None:
        return torch.tensor([height, width], dtype=like.dtype, device=like.device).expand(batch, 2)
    rows = mask.any(dim=-1).sum(dim=-1)
    cols = mask.any(dim=-2).sum(dim=-1)
    return torch.stack([rows, cols], dim=-1).to(like.dtype).clamp_min(1.0)


def sine_position_embedding(
    mask: Tensor | None, shape: tuple[int, int, int], dim: int, *, like: Tensor,
    temperature: float = 10000.0,
) -> Tensor:
    """DETR's 2-D sine embedding with coordinates normalised by each image's real extent.

    Args:
        mask: ``(B, H, W)`` bool or ``None``; shape: ``(B, H, W)``; dim: channels (even).
        like: a tensor giving dtype and device.

    Returns:
        ``(B, dim, H, W)``: ``dim / 2`` channels for ``y`` then ``dim / 2`` for ``x``.
    """
    batch, height, width = shape
    extent = real_extent(mask, batch, height, width, like)
    ys = torch.arange(height, dtype=like.dtype, device=like.device) + 0.5
    xs = torch.arange(width, dtype=like.dtype, device=like.device) + 0.5
    y = (ys.view(1, height, 1) / extent[:, 0].view(batch, 1, 1)).expand(batch, height, width)
    x = (xs.view(1, 1, width) / extent[:, 1].view(batch, 1, 1)).expand(batch, height, width)
    return torch.cat([_sine(y, dim // 2, temperature), _sine(x, dim // 2, temperature)], dim=1)


def _sine(coord: Tensor, dim: int, temperature: float) -> Tensor:
    """``(B, H, W)`` coordinates in ``[0, 1]`` -> ``(B, dim, H, W)`` sin/cos features."""
    freqs = temperature ** (2 * (torch.arange(dim, device=coord.device) // 2) / dim)
    angles = coord.unsqueeze(1) * 2 * math.pi / freqs.to(coord.dtype).view(1, -1, 1, 1)
    return torch.stack([angles[:, 0::2].sin(), angles[:, 1::2].cos()], dim=2).flatten(1, 2)


def _upsample2(x: Tensor, size: tuple[int, int]) -> Tensor:
    """Nearest x2 upsampling cropped to ``size``: token ``i`` reads token ``i // 2``."""
    height, width = x.shape[-2:]
    up = F.interpolate(x, size=(2 * height, 2 * width), mode="nearest")
    # Crop by negative padding: a slice's end is clamped behind a guard under torch.export.
    return F.pad(up, (0, size[1] - 2 * width, 0, size[0] - 2 * height))


def masked_group_norm_2d(x: Tensor, weight: Tensor, bias: Tensor, mask: Tensor | None,
                         eps: float = 1e-5) -> Tensor:
    """``GroupNorm(1, C)`` of a channels-first ``(B, C, H, W)`` map over real positions only.

    mask: ``(B, H, W)`` bool or ``None``; padded positions get finite values callers ignore.
    """
    if mask is None:
        return F.group_norm(x, 1, weight, bias, eps)
    m = mask.unsqueeze(1).to(x.dtype)
    count = (m.sum(dim=(1, 2, 3), keepdim=True) * x.shape[1]).clamp_min(1.0)
    mean = (x * m).sum(dim=(1, 2, 3), keepdim=True) / count
    var = (((x - mean) * m) ** 2).sum(dim=(1, 2, 3), keepdim=True) / count
    out = (x - mean) * torch.rsqrt(var + eps)
    return out * weight.view(1, -1, 1, 1) + bias.view(1, -1, 1, 1)


class ConvNorm(nn.Module):
    """Zero padding, conv, masked GroupNorm, optional ReLU: ``(B, Cin, h, w) -> (B, Cout, h, w)``."""

    def __init__(self, cin: int, cout: int, kernel: int, *, act: bool) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=False)
        self.norm = nn.GroupNorm(1, cout)
        self.act = act

    def forward(self, x: Tensor, mask: Tensor | None) -> Tensor:
        x = masked_group_norm_2d(self.conv(zero_padding(x, mask)), self.norm.weight,
                                 self.norm.bias, mask, self.norm.eps)
        return zero_padding(F.relu(x) if self.act else x, mask)


class FPNPixelDecoder(nn.Module):
    """Feature pyramid: ``forward(features, masks) -> PixelDecoderOutput``.

    Args:
        in_channels: channels of the backbone maps at strides 4, 8, 16, 32.
        hidden_dim: output channels ``D``.
        mask_features: also build the stride-4 ``mask_features`` output.
    """

    def __init__(self, in_channels: Sequence[int], hidden_dim: int, *, mask_features: bool = False) -> None:
        super().__init__()
        first = 0 if mask_features else 1
        self.first = first
        self.lateral = nn.ModuleList(ConvNorm(c, hidden_dim, 1, act=False) for c in in_channels[first:])
        self.output = nn.ModuleList(ConvNorm(hidden_dim, hidden_dim, 3, act=True) for _ in in_channels[first:])

    def forward(self, features: Sequence[Tensor], masks: Sequence[Tensor | None]) -> PixelDecoderOutput:
        feats, msks = list(features)[self.first:], list(masks)[self.first:]
        outs: list[Tensor] = []
        top: Tensor | None = None
        for i in reversed(range(len(feats))):
            x = self.lateral[i](feats[i], msks[i])
            if top is not None:
                x = x + zero_padding(_upsample2(top, x.shape[-2:]), msks[i])
            top = x
            outs.insert(0, self.output[i](x, msks[i]))
        if self.first == 0:
            return PixelDecoderOutput(outs[1:], msks[1:], outs[0], msks[0])
        return PixelDecoderOutput(outs, msks)


def ms_deform_sample(
    values: Sequence[Tensor], locations: Tensor, weights: Tensor
) -> Tensor:
    """Multi-scale deformable sampling in plain PyTorch (bilinear, zeros outside).

    Args:
        values: per level ``(B * h, d, H_l, W_l)`` value maps (zero at padding).
        locations: ``(B * h, N, L, P, 2)`` sampling points ``(x, y)`` in each level's token
            units (``(j + 0.5, i + 0.5)`` is the centre of token ``(i, j)``).
        weights: ``(B * h, N, L, P)`` attention weights.

    Returns:
        ``(B * h, N, d)``.
    """
    out = 0
    for level, value in enumerate(values):
        height, width = value.shape[-2:]
        scale = torch.tensor([width, height], dtype=locations.dtype, device=locations.device)
        grid = 2 * locations[:, :, level] / scale - 1  # (B*h, N, P, 2)
        sampled = F.grid_sample(value, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        out = out + (sampled * weights[:, None, :, level]).sum(dim=-1)  # (B*h, d, N)
    return out.transpose(1, 2)  # type: ignore[union-attr]


class MSDeformAttention(nn.Module):
    """Multi-scale deformable self-attention over flattened tokens of ``L`` levels."""

    def __init__(self, dim: int, num_heads: int, num_levels: int, num_points: int) -> None:
        super().__init__()
        self.h, self.levels, self.points = num_heads, num_levels, num_points
        self.offsets = nn.Linear(dim, num_heads * num_levels * num_points * 2)
        self.attn = nn.Linear(dim, num_heads * num_levels * num_points)
        self.value = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)
        # Deformable DETR's init: head k starts looking along direction 2*pi*k/h, point p at
        # distance p + 1 tokens, so heads cover a ring before learning where to look.
        nn.init.zeros_(self.offsets.weight)
        angles = torch.arange(num_heads, dtype=torch.float32) * (2 * math.pi / num_heads)
        ring = torch.stack([angles.cos(), angles.sin()], -1)
        ring = ring / ring.abs().max(-1, keepdim=True).values
        ring = ring.view(num_heads, 1, 1, 2).repeat(1, num_levels, num_points, 1)
        ring = ring * torch.arange(1, num_points + 1, dtype=torch.float32).view(1, 1, -1, 1)
        with torch.no_grad():
            self.offsets.bias.copy_(ring.flatten())
        nn.init.zeros_(self.attn.weight)
        nn.init.zeros_(self.attn.bias)

    def forward(
        self, query: Tensor, src: Tensor, shapes: Sequence[tuple[int, int]], ref: Tensor,
        extents: Tensor, valid: Tensor | None,
    ) -> Tensor:
        """query, src: ``(B, N, D)``; ref: ``(B, N, 2)`` ``(x, y)`` in ``[0, 1]`` of the real
        extent; extents: ``(B, L, 2)`` real ``(h, w)`` per level; valid: ``(B, N)`` or None."""
        batch, length, dim = query.shape
        h, levels, points = self.h, self.levels, self.points
        value = self.value(src)
        if valid is not None:
            value = value * valid.unsqueeze(-1).to(value.dtype)
        value = value.view(batch, length, h, dim // h).permute(0, 2, 3, 1).flatten(0, 1)
        maps, start = [], 0
        for height, width in shapes:
            maps.append(value[..., start : start + height * width].unflatten(-1, (height, width)))
            start += height * width
        offsets = self.offsets(query).view(batch, length, h, levels, points, 2)
        weights = self.attn(query).view(batch, length, h, levels * points).softmax(-1)
        weights = weights.view(batch, length, h, levels, points)
        size_xy = extents.flip(-1).view(batch, 1, 1, levels, 1, 2)
        locations = ref.view(batch, length, 1, 1, 1, 2) * size_xy + offsets
        locations = locations.permute(0, 2, 1, 3, 4, 5).flatten(0, 1)
        weights = weights.permute(0, 2, 1, 3, 4).flatten(0, 1)
        out = ms_deform_sample(maps, locations, weights)  # (B*h, N, d)
        out = out.view(batch, h, length, dim // h).transpose(1, 2).reshape(batch, length, dim)
        return self.proj(out)


class MSDeformEncoderLayer(nn.Module):
    """Post-norm deformable self-attention + FFN over all levels' tokens."""

    def __init__(self, dim: int, num_heads: int, num_levels: int, num_points: int, ffn_dim: int) -> None:
        super().__init__()
        self.attn = MSDeformAttention(dim, num_heads, num_levels, num_points)
        self.norm1 = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_dim), nn.ReLU(), nn.Linear(ffn_dim, dim))
        self.norm2 = nn.LayerNorm(dim)

    def forward(self, src: Tensor, pos: Tensor, shapes: Sequence[tuple[int, int]], ref: Tensor,
                extents: Tensor, valid: Tensor | None) -> Tensor:
        src = self.norm1(src + self.attn(src + pos, src, shapes, ref, extents, valid))
        return self.norm2(src + self.ffn(src))


class MSDeformPixelDecoder(nn.Module):
    """Deformable-attention encoder over strides 8/16/32 (+ FPN step to stride 4).

    Args:
        in_channels: backbone channels at strides 4, 8, 16, 32.
        hidden_dim: ``D``; num_layers: encoder layers; num_heads, num_points: attention shape.
        mask_features: also build the stride-4 ``mask_features`` output.
    """

    def __init__(
        self, in_channels: Sequence[int], hidden_dim: int, *, num_layers: int = 6,
        num_heads: int = 8, num_points: int = 4, ffn_dim: int | None = None,
        mask_features: bool = False,
    ) -> None:
        super().__init__()
        self.hidden_dim = hidden_dim
        self.input_proj = nn.ModuleList(ConvNorm(c, hidden_dim, 1, act=False) for c in in_channels[1:])
        self.level_embed = nn.Parameter(torch.randn(3, hidden_dim) * 0.02)
        ffn = ffn_dim or 4 * hidden_dim
        self.layers = nn.ModuleList(
            MSDeformEncoderLayer(hidden_dim, num_heads, 3, num_points, ffn) for _ in range(num_layers)
        )
        self.mask_lateral = ConvNorm(in_channels[0], hidden_dim, 1, act=False) if mask_features else None
        self.mask_output = ConvNorm(hidden_dim, hidden_dim, 3, act=True) if mask_features else None

    def forward(self, features: Sequence[Tensor], masks: Sequence[Tensor | None]) -> PixelDecoderOutput:
        feats, msks = list(features)[1:], list(masks)[1:]
        tokens, poses, refs, extents, valids, shapes = [], [], [], [], [], []
        for level, (x, mask) in enumerate(zip(feats, msks, strict=True)):
            x = self.input_proj[level](x, mask)
            batch, dim, height, width = x.shape
            shapes.append((height, width))
            pos = sine_position_embedding(mask, (batch, height, width), dim, like=x)
            tokens.append(x.flatten(2).transpose(1, 2))
            poses.append((pos + self.level_embed[level].view(1, -1, 1, 1)).flatten(2).transpose(1, 2))
            extent = real_extent(mask, batch, height, width, x)  # (B, 2) (h, w)
            extents.append(extent)
            ys = (torch.arange(height, dtype=x.dtype, device=x.device) + 0.5).view(1, height, 1)
            xs = (torch.arange(width, dtype=x.dtype, device=x.device) + 0.5).view(1, 1, width)
            ref_y = (ys / extent[:, 0].view(-1, 1, 1)).expand(batch, height, width)
            ref_x = (xs / extent[:, 1].view(-1, 1, 1)).expand(batch, height, width)
            refs.append(torch.stack([ref_x, ref_y], -1).flatten(1, 2))
            valids.append(None if mask is None else mask.flatten(1))
        src, pos, ref = torch.cat(tokens, 1), torch.cat(poses, 1), torch.cat(refs, 1)
        level_extents = torch.stack(extents, 1)
        valid = None if all(v is None for v in valids) else torch.cat(
            [v if v is not None else torch.ones(t.shape[:2], dtype=torch.bool, device=t.device)
             for v, t in zip(valids, tokens, strict=True)], 1)
        for layer in self.layers:
            src = layer(src, pos, shapes, ref, level_extents, valid)
        outs, start = [], 0
        for (height, width), mask in zip(shapes, msks, strict=True):
            chunk = src[:, start : start + height * width].transpose(1, 2)
            outs.append(zero_padding(chunk.reshape(src.shape[0], -1, height, width), mask))
            start += height * width
        if self.mask_lateral is None or self.mask_output is None:
            return PixelDecoderOutput(outs, msks)
        x = self.mask_lateral(features[0], masks[0])
        x = x + zero_padding(_upsample2(outs[0], x.shape[-2:]), masks[0])
        return PixelDecoderOutput(outs, msks, self.mask_output(x, masks[0]), masks[0])


def build_pixel_decoder(
    kind: str, in_channels: Sequence[int], hidden_dim: int, *, mask_features: bool = False,
    num_layers: int = 6, num_heads: int = 8, num_points: int = 4,
) -> nn.Module:
    """``"fpn"`` or ``"msdeform"`` pixel decoder (see the module docstring)."""
    if kind == "fpn":
        return FPNPixelDecoder(in_channels, hidden_dim, mask_features=mask_features)
    if kind == "msdeform":
        return MSDeformPixelDecoder(
            in_channels, hidden_dim, num_layers=num_layers, num_heads=num_heads,
            num_points=num_points, mask_features=mask_features,
        )
    raise ValueError(f"unknown pixel decoder {kind!r}; expected one of {PIXEL_DECODERS}")
