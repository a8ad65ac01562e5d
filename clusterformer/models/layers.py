"""Small building blocks of the backbone: masked normalisation and pooling, pixel-mask
downsampling, coordinate channels, stochastic depth and the token MLP.

Blocks run channels-last ``(B, H, W, C)`` (Linear layers are much faster than 1x1 convs
on CPU); stage outputs and the stride-2 convs are channels-first.

Masks are ``(B, H, W)`` bool with ``True`` = real pixel (or token). ``None`` everywhere means
"every position is real" and takes the plain, cheaper path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from clusterformer.ops.fused_linear import linear

_EPS = 1e-6


def static_sizes(x: Tensor) -> bool:
    """True when every size of ``x`` is a concrete int: eager, ``torch.compile`` with static
    shapes. ``torch.export`` with dynamic sizes traces symbolic ints, and the fast paths that
    depend on strides or on divisibility then step aside: a branch on a symbolic size would
    specialise the exported graph to the example's size."""
    return all(isinstance(size, int) for size in x.shape)


def drop_legacy_keys(module: nn.Module, state_dict: dict, prefix: str) -> None:
    """Remove from ``state_dict`` the keys under ``prefix`` that ``module`` lists in its
    ``legacy_state_keys``: tensors older checkpoints hold that this model no longer has and that
    had no effect (call from ``_load_from_state_dict``, so ``load_state_dict(strict=True)`` and
    timm's loaders accept those checkpoints)."""
    for key in getattr(module, "legacy_state_keys", ()):
        state_dict.pop(prefix + key, None)


def legacy_state_keys(model: nn.Module) -> set[str]:
    """Every full state-dict key of ``model``'s ``legacy_state_keys`` (see
    :func:`drop_legacy_keys`)."""
    return {f"{name}.{key}" if name else key for name, module in model.named_modules()
            for key in getattr(module, "legacy_state_keys", ())}  # fmt: skip


def masked_group_norm(
    x: Tensor, weight: Tensor, bias: Tensor, mask: Tensor | None, eps: float = 1e-5
) -> Tensor:
    """``GroupNorm(1, C)`` of a channels-last map whose statistics use only real positions.

    Args:
        x: ``(B, H, W, C)``; weight, bias: ``(C,)``; mask: ``(B, H, W)`` bool or ``None``.

    Returns:
        ``(B, H, W, C)``. Padded positions get finite values that callers ignore.
    """
    if mask is None and static_sizes(x) and x[0].numel() > 1:
        # GroupNorm's own kernel on the channels-last view: statistics and the per-channel
        # affine in two passes over the map (a layer norm then `* weight + bias` took four,
        # each writing a fresh map). Same numbers up to float rounding. (GroupNorm refuses a
        # group of one value, which the layer norm below normalises to the bias.)
        return F.group_norm(x.permute(0, 3, 1, 2), 1, weight, bias, eps).permute(0, 2, 3, 1)
    if mask is None:
        # Symbolic sizes (torch.export): one layer norm over (H, W, C) = GroupNorm(1, C),
        # whose graph needs no guard on the strides of the permuted view.
        return F.layer_norm(x, x.shape[1:], eps=eps) * weight + bias
    m = mask.unsqueeze(-1).to(x.dtype)
    count = (m.sum(dim=(1, 2, 3), keepdim=True) * x.shape[-1]).clamp_min(1.0)
    mean = (x * m).sum(dim=(1, 2, 3), keepdim=True) / count
    var = (((x - mean) * m) ** 2).sum(dim=(1, 2, 3), keepdim=True) / count
    return (x - mean) * torch.rsqrt(var + eps) * weight + bias


class MaskedGroupNorm(nn.Module):
    """``GroupNorm(1, C)`` (LayerNorm over ``H, W, C``) for channels-last maps, with an
    optional padding mask. ``(B, H, W, C), (B, H, W) | None -> (B, H, W, C)``."""

    def __init__(self, num_channels: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        return masked_group_norm(x, self.weight, self.bias, mask, self.eps)


def downsample_mask(mask: Tensor | None, factor: int) -> Tensor | None:
    """Token mask of a map downsampled by ``factor`` with ceil division (``any`` pooling).

    A token is real when *any* pixel it covers is real. That keeps the border tokens an
    unpadded image of the same size would have (its last, partial patch is real too), which
    is what makes a zero-padded image with a mask see exactly the tokens of the unpadded one;
    ``min``/``all`` pooling would drop those border tokens.

    Args:
        mask: ``(B, H, W)`` bool or ``None``.

    Returns:
        ``(B, ceil(H / factor), ceil(W / factor))`` bool, or ``None``.
    """
    if mask is None:
        return None
    pooled = F.max_pool2d(mask.unsqueeze(1).float(), factor, factor, ceil_mode=True)
    return pooled.squeeze(1) > 0.5


def masked_mean(x: Tensor, mask: Tensor | None) -> Tensor:
    """Global average pool of ``(B, C, H, W)`` over real positions -> ``(B, C)``."""
    if mask is None:
        return x.mean(dim=(2, 3))
    m = mask.unsqueeze(1).to(x.dtype)
    return (x * m).sum(dim=(2, 3)) / m.sum(dim=(2, 3)).clamp_min(1.0)


def zero_padding(x: Tensor, mask: Tensor | None) -> Tensor:
    """Zero the padded positions of ``(B, C, H, W)`` so a following conv sees what a conv
    with zero padding sees at the border of the unpadded image."""
    return x if mask is None else x * mask.unsqueeze(1).to(x.dtype)


def coordinate_channels(images: Tensor, mask: Tensor | None) -> Tensor:
    """Two channels with each pixel's normalised ``x`` and ``y`` in ``[-1, 1]``.

    Coordinates are pixel centres normalised by each image's *real* extent (the number of
    real pixels along the row/column, as DETR's sine embedding does with a cumsum of the
    mask), so a zero-padded image gets the same coordinates as the unpadded one. Padded
    pixels get 0.

    Args:
        images: ``(B, 3, H, W)``; mask: ``(B, H, W)`` bool or ``None``.

    Returns:
        ``(B, 2, H, W)`` in the dtype of ``images``.
    """
    batch, _, height, width = images.shape
    dtype, device = images.dtype, images.device
    if mask is None:
        ys = (torch.arange(height, device=device, dtype=dtype) + 0.5) / height
        xs = (torch.arange(width, device=device, dtype=dtype) + 0.5) / width
        grid_y = (2 * ys - 1).view(1, 1, height, 1).expand(batch, 1, height, width)
        grid_x = (2 * xs - 1).view(1, 1, 1, width).expand(batch, 1, height, width)
        return torch.cat([grid_x, grid_y], dim=1)
    m = mask.to(dtype)
    cum_y = m.cumsum(dim=1)
    cum_x = m.cumsum(dim=2)
    ys = (cum_y - 0.5) / cum_y[:, -1:, :].clamp_min(1.0)
    xs = (cum_x - 0.5) / cum_x[:, :, -1:].clamp_min(1.0)
    return torch.stack([(2 * xs - 1) * m, (2 * ys - 1) * m], dim=1)


def drop_path(x: Tensor, rate: float, training: bool) -> Tensor:
    """Stochastic depth: drop the whole residual branch per sample with probability ``rate``.

    Args:
        x: ``(B, ...)`` residual branch output.
    """
    if rate <= 0.0 or not training:
        return x
    keep = 1.0 - rate
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    survive = torch.empty(shape, dtype=x.dtype, device=x.device).bernoulli_(keep)
    return x * survive / keep


class DropPath(nn.Module):
    """Module form of :func:`drop_path`."""

    def __init__(self, rate: float = 0.0) -> None:
        super().__init__()
        self.rate = float(rate)

    def forward(self, x: Tensor) -> Tensor:
        return drop_path(x, self.rate, self.training)

    def extra_repr(self) -> str:
        return f"rate={self.rate:.3f}"


class TokenMlp(nn.Module):
    """Pointwise MLP ``(..., D) -> (..., D)``: Linear, GELU, Linear (pointwise, so padding
    never leaks into real positions). ``ops.linear`` fuses the bias and the GELU into the
    product on CPU inference."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        hidden = linear(x, self.fc1.weight, self.fc1.bias, activation="gelu")
        return linear(hidden, self.fc2.weight, self.fc2.bias)
