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
``F.linear`` (+ ``F.gelu``): while ``torch.export`` or ONNX export trace the model (their
consumers know only standard aten ops), under ``vmap``/``grad`` (no batching rule), under
Python dispatch modes such as ``FlopCounterMode`` (they expect standard aten ops), and for
anything but float32/bfloat16 CPU tensors; a backward with ``create_graph`` (double backward)
uses differentiable aten products. Numbers equal the plain path up to float rounding (tested,
values and gradients).

While ``torch.compile`` traces the model the same kernel is reached through a custom op
(``ops/linear_op.py``): inductor would otherwise decompose the linear and lose the fusion.

Under CPU autocast to bfloat16 the fast path runs in bfloat16, as ``F.linear`` would under
autocast: oneDNN's kernel is no autocast op, so handed float32 tensors it would multiply in
float32 and the backbone's MLPs would miss autocast's speed-up. The input is cast
(differentiably); a parameter is cast once and its copy reused until the parameter changes (see
``_CASTS``): once per training step, and once for any number of inference calls, where
autocast's own cache casts again in every ``autocast`` region and not at all for weights that need
no gradient. The gradients reach the float32 parameters in float32, as autocast's do. Any other
autocast (float16 on CPU, every GPU autocast) goes through ``F.linear``, which autocast handles
itself.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils._python_dispatch import _get_current_dispatch_mode
from torch.utils.weak import WeakIdKeyDictionary

from clusterformer.ops.linear_op import (
    fingerprint,
    forget_packed,
    onednn_linear,
    packed_weight,
    same_values,
)

Activation = Literal["none", "gelu"]
ACTIVATIONS: tuple[str, ...] = ("none", "gelu")


def _onednn_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


_ONEDNN = _onednn_available()
# ``torch.compiler.is_exporting`` came with torch 2.7; before it every trace counts as an export,
# so older torch compiles plain aten ops (no custom op), as this module did before it had one.
# torch releases whose dynamo answered True while compiling (pytorch#176347) fall back the same.
_is_exporting = getattr(torch.compiler, "is_exporting", torch.compiler.is_compiling)
_FUSED_DTYPES = (torch.float32, torch.bfloat16)
# Up to this many rows the weight gradient ``grad^T @ x`` is oneDNN's; above it BLAS's. The
# number is the reason: at tiny's shapes oneDNN wins the short reductions of stages 3-4 (392 and
# 1568 rows at batch 8) and BLAS the long ones of stages 1-2 (4608 rows and more), so the cut
# lies between them. It is a rough cut (docs/benchmarks.md, "Backward kernels");
# benchmarks/bench_linear_backward.py times both kernels to re-check it.
_ONEDNN_MAX_ROWS_FOR_WEIGHT_GRAD = 2048


def _compute_dtype(x: Tensor, weight: Tensor, bias: Tensor | None, *,
                   traced: bool = False) -> torch.dtype | None:
    """The dtype the oneDNN path multiplies in, or ``None`` where ``F.linear`` must serve.
    ``traced``: under ``torch.compile``, where the custom op serves."""
    if not _ONEDNN or x.device.type != "cpu":
        return None
    dtype = x.dtype
    if torch.is_autocast_enabled("cpu"):
        # Autocast casts float32 (never float64) tensors to its dtype; float16 on a CPU is left
        # to F.linear, whose autocast rule does it.
        dtype = torch.get_autocast_dtype("cpu")
        eligible = (torch.float32, dtype)
        if dtype != torch.bfloat16 or any(
            t is not None and t.dtype not in eligible for t in (x, weight, bias)
        ):
            return None
    elif weight.dtype != dtype or (bias is not None and bias.dtype != dtype):
        return None
    if dtype not in _FUSED_DTYPES:
        return None
    if traced:
        # The custom op has no torch.func rules; ``is_functorch_wrapped_tensor`` is opaque to
        # dynamo, this global check is not.
        return None if torch._C._are_functorch_transforms_active() else dtype
    return dtype if _may_leave_aten(x, weight, bias) else None


def _may_leave_aten(*tensors: Tensor | None) -> bool:
    if torch.compiler.is_compiling() or torch.jit.is_tracing():
        return False
    # A Python dispatch mode (FLOP counting, fake tensors, debug modes) wants the standard
    # aten ops: it does not know oneDNN's.
    if _get_current_dispatch_mode() is not None:
        return False
    # Functorch transforms (vmap, grad) wrap tensors; the oneDNN op has no batching rule.
    return not any(
        t is not None and torch._C._functorch.is_functorch_wrapped_tensor(t) for t in tensors
    )


# parameter -> (its fingerprint, its copy in the compute dtype); weak keys, so a copy lives no
# longer than its parameter. Copies are detached (a copy holding an autograd edge to its parameter
# would keep the parameter alive) and never written to: a changed parameter gets a new copy, and a
# graph that saved the old one keeps it intact. A change is seen by ``linear_op.same_values``:
# version counter, storage and 32 sampled values (fused optimizers move no counter, their steps
# change the samples; a ``.data`` write that misses every sample is not seen, so code editing
# weights must use in-place ops). The backward below also drops the copies of the parameters it
# computes gradients for.
_CASTS: WeakIdKeyDictionary = WeakIdKeyDictionary()


def _cast_param(t: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """``t`` in ``dtype``, detached; a leaf's copy is reused until the leaf changes."""
    if t is None or t.dtype == dtype:
        return t
    # Inference tensors keep no version counter, and a non-leaf (a concatenation of weights) is a
    # new tensor at every call: neither can be cached.
    cacheable = t.is_leaf and not t.is_inference()
    if cacheable:
        entry = _CASTS.get(t)
        if entry is not None and same_values(entry[0], t):
            return entry[1]
    # Outside inference mode, so the copy may be saved for a backward later.
    with torch.inference_mode(False), torch.no_grad():
        copy = t.to(dtype)
    if cacheable:
        _CASTS[t] = (fingerprint(t), copy)
    return copy


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
    backward runs with ``create_graph``).

    ``weight_c`` and ``bias_c`` are ``weight`` and ``bias`` in ``x``'s dtype: the same tensors,
    or under autocast detached copies (``_cast_param``). The product uses the copies; the
    gradients go to ``weight`` and ``bias`` in their own dtype (computed in ``x``'s, as
    autocast's are).
    """

    # The forward takes ``ctx`` itself (no ``setup_context``): with a ``setup_context``,
    # ``Function.apply`` binds every call's arguments through ``inspect.signature``, about
    # 40 us a call, and a training step calls this a few hundred times. ``torch.func`` transforms,
    # which need ``setup_context``, never reach this class (``linear`` takes ``F.linear`` there).
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None,  # type: ignore[override]
                weight_c: Tensor, bias_c: Tensor | None) -> Tensor:
        ctx.save_for_backward(x, weight, weight_c, bias)
        ctx.has_bias = bias is not None
        ctx.param_dtypes = (weight.dtype, None if bias is None else bias.dtype)
        ctx.cast = weight_c is not weight
        return _onednn_linear(x, weight_c, bias_c)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        x, weight, weight_c, bias = ctx.saved_tensors
        # A gradient for a parameter means an update may follow, and fused optimizers update
        # in place without moving the version counter: its next use must cast afresh.
        if ctx.needs_input_grad[1]:
            _CASTS.pop(weight, None)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            _CASTS.pop(bias, None)
        # Under create_graph (double backward) grad mode is on here: every product is then a
        # differentiable aten op, never oneDNN's, and the weight is cast again differentiably
        # (the cached copy has no edge back to the parameter).
        onednn = not torch.is_grad_enabled()
        if onednn or not ctx.cast:
            weight = weight_c
        else:
            weight = weight.to(weight_c.dtype)
        # A backward run inside an autocast region must not recast: the products keep the
        # forward's dtype.
        with torch.autocast("cpu", enabled=False):
            needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[1],
                     ctx.has_bias and ctx.needs_input_grad[2])
            grad_x, grad_w, grad_b = _linear_grads(grad, x, weight, needs, onednn)
        weight_dtype, bias_dtype = ctx.param_dtypes
        if grad_w is not None:
            grad_w = grad_w.to(weight_dtype)
        if grad_b is not None:
            grad_b = grad_b.to(bias_dtype)
        return grad_x, grad_w, grad_b, None, None


def _linear_grads(grad: Tensor, x: Tensor, weight: Tensor, needs: tuple[bool, bool, bool],
                  onednn: bool) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Gradients of ``x @ weight^T + bias`` for ``grad (..., out)``, ``x (..., in)``,
    ``weight (out, in)``: ``(..., in)``, ``(out, in)``, ``(out,)``, each where ``needs`` says.
    In ``x``'s dtype, as autocast computes them: the bfloat16 sum accumulates in float32 and
    rounds once, while asking for a float32 result converts the whole gradient first, ten times
    the sum's time at stage 1 (docs/benchmarks.md, "bf16 autocast on the CPU")."""
    grad_x = grad_w = grad_b = None
    rows = grad.reshape(-1, grad.shape[-1])
    if needs[0]:
        if onednn:
            # The transposed weight goes in as a view: oneDNN repacks it anyway, and a
            # contiguous copy first cost more than oneDNN saves over BLAS on small inputs.
            grad_x = _onednn_linear(grad, weight.t(), None)
        else:
            grad_x = (rows @ weight).reshape(*grad.shape[:-1], weight.shape[1])
    if needs[1]:
        inputs = x.reshape(-1, x.shape[-1])
        if onednn and rows.shape[0] <= _ONEDNN_MAX_ROWS_FOR_WEIGHT_GRAD:
            grad_w = _onednn_weight_grad(rows, inputs)
        else:
            grad_w = rows.t() @ inputs
    if needs[2]:
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
    if _is_exporting():
        out = F.linear(x, weight, bias)
        return _exported_gelu(out) if activation == "gelu" else out
    if torch.compiler.is_compiling():
        return _compiled_linear(x, weight, bias, activation)
    dtype = _compute_dtype(x, weight, bias)
    if dtype is None:
        if isinstance(weight, torch.nn.Parameter):
            forget_packed(weight)  # moved to another device or dtype: its copy cannot serve
        out = F.linear(x, weight, bias)
    else:
        weight_c, bias_c = _cast_param(weight, dtype), _cast_param(bias, dtype)
        if not _needs_grad(x, weight, bias):
            return _onednn_linear(x.to(dtype), _inference_weight(weight, weight_c), bias_c,
                                  attr=activation)
        out = _OneDnnLinear.apply(x.to(dtype), weight, bias, weight_c, bias_c)
    return F.gelu(out) if activation == "gelu" else out


def _inference_weight(weight: Tensor, weight_c: Tensor) -> Tensor:
    """What a no-grad call multiplies by: ``weight_c`` (``weight`` in the compute dtype), packed
    when ``weight`` is a parameter that requires no gradient (``linear_op._PACKED``). A weight
    made for this one call (a concatenation of parameters) would be packed for nothing."""
    if not isinstance(weight, torch.nn.Parameter):
        return weight_c
    if weight.requires_grad:  # trainable again: its copy from a frozen spell cannot serve
        forget_packed(weight)
        return weight_c
    return packed_weight(weight_c)


def _compiled_linear(x: Tensor, weight: Tensor, bias: Tensor | None, activation: Activation) -> Tensor:
    """``linear`` as ``torch.compile`` traces it: the oneDNN custom op (``ops/linear_op.py``)
    where the eager fast path would run, so inductor calls the fused kernel instead of
    decomposing it; ``F.linear`` elsewhere. Casts to the compute dtype are graph ops (frozen
    weights' casts fold away). With gradients the op runs without the activation and
    ``F.gelu`` follows, as in eager: GELU's backward needs the pre-activation."""
    dtype = _compute_dtype(x, weight, bias, traced=True)
    if dtype is None:
        out = F.linear(x, weight, bias)
        return F.gelu(out) if activation == "gelu" else out
    x, weight = x.to(dtype), weight.to(dtype)
    bias = None if bias is None else bias.to(dtype)
    if not _needs_grad(x, weight, bias):
        return onednn_linear(x, weight, bias, activation)
    out = onednn_linear(x, weight, bias, "none")
    return F.gelu(out) if activation == "gelu" else out


def _exported_gelu(x: Tensor) -> Tensor:
    """``F.gelu`` (erf form) as ``torch.export`` should see it: ``x * (erf(x / sqrt(2)) + 1) *
    0.5``, the order of operations ONNX Runtime's GELU fusion matches (the TorchScript
    exporter's). The dynamo exporter writes ``aten.gelu`` as ``x * (0.5 * (erf(x / sqrt(2)) +
    1))``, which ONNX Runtime runs as five passes over the MLPs' largest tensors (``Div``,
    ``Erf``, ``Add``, two ``Mul``) instead of one fused ``BiasGelu`` (docs/benchmarks.md,
    "ONNX Runtime: where tiny's time goes")."""
    return x * (torch.erf(x / _SQRT2) + 1.0) * 0.5


_SQRT2 = math.sqrt(2.0)
