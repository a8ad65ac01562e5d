"""``linear`` with an optional fused activation, fast on CPU inference.

On a CPU, PyTorch's eager ``F.linear`` calls BLAS ``addmm``, which first writes the bias into
the whole output and then accumulates the product into it; an activation after it is one more
pass over a fresh tensor. The backbone's MLPs hold the largest tensors of the model (stage 1's
hidden layer is 25088 x 768 at batch 8), so those extra passes over memory cost a sizeable part
of the product's own time. oneDNN's inner-product primitive adds the bias and applies GELU while
each output tile is still in cache (it is the kernel inductor uses for a frozen model), and it
also multiplies faster than BLAS at the backbone's shapes. The measurements are in
``docs/benchmarks.md`` ("What changed (eager, same math)", items 1 and 7).

The fused kernel has no autograd formula of its own. Where a gradient is needed, the product
(without the activation, whose backward needs the pre-activation) runs through a small autograd
function: oneDNN for the forward and for the input gradient (handed the transposed weight as a
view: oneDNN packs every weight into its own blocked layout anyway, so we make no copy), and
for the weight gradient oneDNN for short reductions, BLAS for the long ones of the early stages,
where BLAS is the faster of the two. Everything else is plain
``F.linear`` (+ ``F.gelu``): while ``torch.compile``, ``torch.export`` or ONNX export trace the
model (they fuse on their own), under ``vmap``/``grad`` (no batching rule), under Python
dispatch modes such as ``FlopCounterMode`` (they expect standard aten ops), and for anything
but float32/bfloat16 CPU tensors; a backward with ``create_graph`` (double backward) uses
differentiable aten products. Numbers equal the plain path up to
float rounding (tested, values and gradients).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils._python_dispatch import _get_current_dispatch_mode

Activation = Literal["none", "gelu"]
ACTIVATIONS: tuple[str, ...] = ("none", "gelu")


def _onednn_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


_ONEDNN = _onednn_available()
_FUSED_DTYPES = (torch.float32, torch.bfloat16)
# Up to this many rows the weight gradient ``grad^T @ x`` is oneDNN's; above it BLAS's. The
# number is the reason: at tiny's shapes oneDNN wins the short reductions of stages 3-4 (392 and
# 1568 rows at batch 8) and BLAS the long ones of stages 1-2 (4608 rows and more), so the cut
# lies between them. It is a rough cut (docs/benchmarks.md, "Backward kernels");
# benchmarks/bench_linear_backward.py times both kernels to re-check it.
_ONEDNN_MAX_ROWS_FOR_WEIGHT_GRAD = 2048


def _use_onednn(x: Tensor, weight: Tensor, bias: Tensor | None) -> bool:
    if not _ONEDNN or x.device.type != "cpu" or x.dtype not in _FUSED_DTYPES:
        return False
    if weight.dtype != x.dtype or (bias is not None and bias.dtype != x.dtype):
        return False
    if torch.compiler.is_compiling() or torch.jit.is_tracing():
        return False
    # A Python dispatch mode (FLOP counting, fake tensors, debug modes) wants the standard
    # aten ops: it does not know oneDNN's.
    if _get_current_dispatch_mode() is not None:
        return False
    # Functorch transforms (vmap, grad) wrap tensors; the oneDNN op has no batching rule.
    return not torch._C._functorch.is_functorch_wrapped_tensor(x)


def _needs_grad(*tensors: Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _onednn_linear(x: Tensor, weight: Tensor, bias: Tensor | None, attr: str = "none") -> Tensor:
    if bias is None:
        # A zero bias, not none: oneDNN's inner product without a bias is markedly slower than
        # with one at the backbone's shapes (docs/benchmarks.md, "Backward kernels"), and
        # adding exact zeros changes no value.
        bias = x.new_zeros(weight.shape[0])
    return torch.ops.mkldnn._linear_pointwise(
        x, weight, bias, attr, [], "none" if attr == "gelu" else ""
    )


def _onednn_weight_grad(grad: Tensor, x: Tensor) -> Tensor:
    """``grad^T @ x``, ``(out, in)``, for ``grad (rows, out)`` and ``x (rows, in)``, by oneDNN.

    The narrower side is the product's rows and the wider one its packed weight: oneDNN packs
    its weight operand, so the smaller repacked operand is the cheaper orientation (never the
    slower one at the shapes timed in ``benchmarks/bench_linear_backward.py``).
    """
    if grad.shape[1] <= x.shape[1]:
        return _onednn_linear(grad.t(), x.t(), None)
    return _onednn_linear(x.t(), grad.t(), None).t()


class _OneDnnLinear(torch.autograd.Function):
    """``x @ weight^T + bias`` by oneDNN, with its gradients (differentiable again when the
    backward runs with ``create_graph``)."""

    @staticmethod
    def forward(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:  # type: ignore[override]
        return _onednn_linear(x, weight, bias)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:  # type: ignore[override]
        x, weight, bias = inputs
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        x, weight = ctx.saved_tensors
        grad_x = grad_w = grad_b = None
        rows = grad.reshape(-1, grad.shape[-1])
        # Under create_graph (double backward) grad mode is on here: every product is then a
        # differentiable aten op, never oneDNN's.
        onednn = not torch.is_grad_enabled()
        if ctx.needs_input_grad[0]:
            if onednn:
                # The transposed weight goes in as a view: oneDNN repacks it anyway, and a
                # contiguous copy first cost more than oneDNN saves over BLAS on small inputs.
                grad_x = _onednn_linear(grad, weight.t(), None)
            else:
                grad_x = (rows @ weight).reshape(*grad.shape[:-1], weight.shape[1])
        if ctx.needs_input_grad[1]:
            inputs = x.reshape(-1, x.shape[-1])
            if onednn and rows.shape[0] <= _ONEDNN_MAX_ROWS_FOR_WEIGHT_GRAD:
                grad_w = _onednn_weight_grad(rows, inputs)
            else:
                grad_w = rows.t() @ inputs
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = rows.sum(0)
        return grad_x, grad_w, grad_b


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
    if not _use_onednn(x, weight, bias):
        out = F.linear(x, weight, bias)
    elif not _needs_grad(x, weight, bias):
        return _onednn_linear(x, weight, bias, attr=activation)
    else:
        out = _OneDnnLinear.apply(x, weight, bias)
    return F.gelu(out) if activation == "gelu" else out
