"""Find NaN or infinity in weights and model outputs (pure helpers, no engine imports)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch


def first_non_finite(tensors: Mapping[str, torch.Tensor]) -> str | None:
    """The name of the first floating-point tensor holding NaN or infinity, else None."""
    for name, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            return name
    return None


def non_finite_output(outputs: Any, name: str = "") -> str | None:
    """Where the first floating-point tensor in ``outputs`` (a tensor or nested dicts / lists)
    holding NaN or infinity is ("" for a bare tensor, else its key path), or None."""
    if isinstance(outputs, torch.Tensor):
        bad = outputs.is_floating_point() and not bool(torch.isfinite(outputs).all())
        return name if bad else None
    if isinstance(outputs, Mapping):
        items = list(outputs.items())
    elif isinstance(outputs, list | tuple):
        items = list(enumerate(outputs))
    else:
        return None
    for key, value in items:
        bad = non_finite_output(value, f"{name}.{key}" if name else str(key))
        if bad is not None:
            return bad
    return None


def describe_output(where: str) -> str:
    return f"output {where}" if where else "output"
