"""``linear`` with an optional fused activation, fast on CPU inference.

On a CPU, PyTorch's eager ``F.linear`` calls BLAS ``addmm``, which first writes the bias into
the whole output and then accumulates the product into it; an activation after it is one more
pass over a fresh tensor. For the backbone's MLPs (the largest tensors of the model: stage 1's
hidden layer is 25088 x 768 at batch 8) that glue cost about a third of the time of the product
itself. oneDNN's inner-product primitive adds the bias and applies GELU while each output tile
is still in cache; it is the kernel inductor uses for a frozen model. Measured at one thread on
this project's machine (AMD EPYC, torch 2.13): 94-102 GFLOP/s against 52-96 for ``F.linear``
at the backbone's shapes (``docs/benchmarks.md``, "Eager fast paths").

The fused kernel has no autograd formula, so it is taken only where nothing needs a gradient:
inference (``torch.no_grad`` / ``inference_mode``) or inputs and weights that do not require
one. It is also skipped while ``torch.compile``, ``torch.export`` or ONNX export trace the model
(they see the plain ``F.linear`` + activation, which they fuse themselves), and for anything but
float32/bfloat16 CPU tensors. Numbers equal the plain path up to float rounding (tested).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

Activation = Literal["none", "gelu"]
ACTIVATIONS: tuple[str, ...] = ("none", "gelu")


def _onednn_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


_ONEDNN = _onednn_available()
_FUSED_DTYPES = (torch.float32, torch.bfloat16)


def _use_onednn(x: Tensor, weight: Tensor, bias: Tensor | None) -> bool:
    if not _ONEDNN or x.device.type != "cpu" or x.dtype not in _FUSED_DTYPES:
        return False
    if weight.dtype != x.dtype or (bias is not None and bias.dtype != x.dtype):
        return False
    if torch.compiler.is_compiling() or torch.jit.is_tracing():
        return False
    if torch.is_grad_enabled() and (
        x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)
    ):
        return False
    # Functorch transforms (vmap, grad) wrap tensors; the oneDNN op has no batching rule.
    return not torch._C._functorch.is_functorch_wrapped_tensor(x)


def linear(
    x: Tensor, weight: Tensor, bias: Tensor | None = None, *, activation: Activation = "none"
) -> Tensor:
    """``activation(x @ weight^T + bias)``, as ``F.linear`` (+ ``F.gelu``, exact erf form).

    Args:
        x: ``(..., in)``.
        weight: ``(out, in)`` (``nn.Linear`` layout).
        bias: ``(out,)`` or ``None``.
        activation: ``"none"`` or ``"gelu"``.

    Returns:
        ``(..., out)``.
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; expected one of {ACTIVATIONS}")
    if _use_onednn(x, weight, bias):
        attr, algorithm = ("gelu", "none") if activation == "gelu" else ("none", "")
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, attr, [], algorithm)
    out = F.linear(x, weight, bias)
    return F.gelu(out) if activation == "gelu" else out
