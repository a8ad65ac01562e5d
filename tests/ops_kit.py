"""Helpers shared by the clustering and dispatching op tests: seeded float64 inputs, padding
masks and a two-layer MLP, and the property-test settings."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from hypothesis import settings
from hypothesis import strategies as st

PROPS = settings(max_examples=40, deadline=None)

lead_shapes = st.lists(st.integers(1, 3), min_size=0, max_size=2).map(tuple)


def rand(seed: int, *shape: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def rand_mask(seed: int, *shape: int) -> torch.Tensor:
    """Random pixel mask with at least one real pixel per row, like real padding."""
    mask = torch.rand(*shape, generator=torch.Generator().manual_seed(seed)) > 0.4
    return mask.index_fill(-1, torch.tensor([0]), True)


def mlp_for(dim: int, seed: int):
    w1, w2 = rand(seed, 2 * dim, dim), rand(seed + 1, dim, 2 * dim)
    return lambda x: F.linear(F.gelu(F.linear(x, w1)), w2)
