"""Point sampling for mask losses (PointRend / Mask2Former), as pure functions.

Mask losses and matching costs are computed on a few thousand sampled points rather than on
every pixel. Points are ``(x, y)`` in ``[0, 1]`` of a map's extent (``(0, 0)`` is the top-left
corner, ``(1, 1)`` the bottom-right one); :func:`point_sample` reads a map there bilinearly
with ``F.grid_sample`` (``align_corners=False``, zeros outside).

* Matching: :func:`uniform_points` -- the same uniform random points for every prediction and
  target of an image, so the cost of every pair is measured on the same pixels.
* Loss: :func:`importance_points` -- ``oversample_ratio * P`` uniform candidates, the
  ``importance_sample_ratio * P`` most uncertain of them (uncertainty ``-|logit|``: logits near
  0 are the mask's boundary) plus uniform points for the rest.

Randomness comes from ``generator`` (or torch's global generator when ``None``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def point_sample(input: Tensor, coords: Tensor, *, padding_mode: str = "zeros") -> Tensor:
    """Bilinear values of ``input`` at ``coords``.

    Args:
        input: ``(N, C, H, W)`` maps.
        coords: ``(N, P, 2)`` points ``(x, y)`` in ``[0, 1]`` of each map's extent.
        padding_mode: what lies outside the map: ``"zeros"`` (padding, the default) or
            ``"border"`` (the edge repeats: use it for target masks that cover the whole image,
            so the half pixel along the image border is not faded towards 0).

    Returns:
        ``(N, C, P)``.
    """
    grid = (2.0 * coords - 1.0).unsqueeze(2).to(input.dtype)  # (N, P, 1, 2)
    out = F.grid_sample(input, grid, mode="bilinear", padding_mode=padding_mode, align_corners=False)
    return out.squeeze(3)


def uniform_points(
    num: int, num_points: int, *, device: torch.device | str | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """``(num, num_points, 2)`` float32 points uniform in ``[0, 1)^2``."""
    return torch.rand(num, num_points, 2, device=device, generator=generator)


def uncertainty(logits: Tensor) -> Tensor:
    """``-|logit|``: highest (0) on the decision boundary. Any shape -> same shape."""
    return -logits.abs()


def importance_points(
    logits: Tensor,
    num_points: int,
    *,
    oversample_ratio: float = 3.0,
    importance_sample_ratio: float = 0.75,
    scale: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Uncertainty-based point selection (PointRend's training-time sampling).

    Args:
        logits: ``(N, 1, H, W)`` mask logits (read without gradient).
        num_points: ``P`` points per mask.
        oversample_ratio: ``k``; ``k * P`` uniform candidates are scored (``k >= 1``).
        importance_sample_ratio: ``beta``; ``beta * P`` most uncertain candidates are kept, the
            other ``(1 - beta) * P`` points are fresh uniform ones.
        scale: optional ``(N, 2)`` ``(sx, sy)``: the points are drawn in ``[0, 1]`` of a
            sub-extent (e.g. an image's real, unpadded part) that covers ``scale`` of the
            map; candidates are scored at ``coords * scale`` in the map.
        generator: random source.

    Returns:
        ``(N, P, 2)`` points in ``[0, 1]`` of the (sub-)extent.
    """
    if oversample_ratio < 1:
        raise ValueError(f"oversample_ratio must be >= 1, got {oversample_ratio}")
    if not 0.0 <= importance_sample_ratio <= 1.0:
        raise ValueError(f"importance_sample_ratio must be in [0, 1], got {importance_sample_ratio}")
    num = logits.shape[0]
    num_sampled = int(num_points * oversample_ratio)
    candidates = uniform_points(num, num_sampled, device=logits.device, generator=generator)
    where = candidates if scale is None else candidates * scale.to(candidates).unsqueeze(1)
    scores = uncertainty(point_sample(logits.detach().float(), where))[:, 0]  # (N, kP)
    num_uncertain = int(importance_sample_ratio * num_points)
    index = scores.topk(num_uncertain, dim=1).indices
    chosen = candidates.gather(1, index.unsqueeze(-1).expand(-1, -1, 2))
    num_random = num_points - num_uncertain
    if num_random > 0:
        extra = uniform_points(num, num_random, device=logits.device, generator=generator)
        chosen = torch.cat([chosen, extra], dim=1)
    return chosen
