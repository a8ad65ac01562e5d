"""Helpers shared by the ``ops.linear`` tests (autocast, compiled): seeded inputs, the plain
``F.linear`` (+ GELU) reference, and the relative difference the tolerances are stated in."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def rel_diff(got: Tensor, want: Tensor) -> float:
    """max |got - want| / max(max |want|, 0.1)."""
    return ((got.float() - want.float()).abs().max() / want.float().abs().max().clamp_min(0.1)).item()


def rand(seed: int, *shape: int) -> Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def reference(x: Tensor, weight: Tensor, bias: Tensor | None, activation: str) -> Tensor:
    out = F.linear(x, weight, bias)
    return F.gelu(out) if activation == "gelu" else out
