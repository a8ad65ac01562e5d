"""oneDNN's fused linear as a PyTorch custom op: what ``torch.compile`` sees of ``ops.linear``.

Traced as ``F.linear`` + ``F.gelu``, the backbone's MLPs are decomposed by inductor: on a frozen
graph it swaps in oneDNN's packed linear only for the input ranks its pattern knows, not the
backbone's ``(B, H, W, C)`` maps, and otherwise calls BLAS ``addmm`` and runs GELU as a loop of
its own, which made compiled tiny slower than eager tiny (docs/benchmarks.md, "``torch.compile``:
the fused linear as a custom op"). A custom op is opaque to inductor: the compiled graph calls
the fused kernel eager calls, and inductor fuses and plans what lies around it. The op has a
fake implementation (shapes only, for tracing) and an autograd formula, so training graphs
compile with it too. It has no ``torch.func`` rules (custom ops support only ``vmap`` there, and
``grad`` not at all): under a function transform ``ops.linear`` traces ``F.linear`` instead.

Only ``torch.compile`` uses the op (``ops.linear`` picks it while compiling, never while
exporting: ONNX Runtime and ``torch.export`` consumers know only standard aten ops); eager
calls the kernel directly (``ops/fused_linear.py``). Telling a compile from an export needs
``torch.compiler.is_exporting`` (torch 2.7): older torch compiles ``F.linear`` as before.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary

OP_NAME = "clusterformer::onednn_linear"

# weight -> (its fingerprint, oneDNN's blocked copy of it): parameters no gradient flows to, for
# inference calls. Handed a plain weight, oneDNN reorders it into its blocked layout on every
# call; at stages 3-4 of tiny (a few hundred rows against up to 3072 x 768 weights) that reorder
# is 5-7 % of the product, and packing once made tiny's eager inference 1-5 % faster
# (docs/benchmarks.md, "Packed weights for inference"). Only parameters that require no gradient
# (``model.requires_grad_(False)``, as ``clusterformer.load`` and ``cf eval``/``predict`` do) and
# autocast's copies of them (``fused_linear._CASTS``); a parameter that requires one again drops
# its copy at its next use. Every use compares the fingerprint (``same_values``). The copies cost
# one more copy of those weights' memory; weak keys, so a copy lives no longer than its weight.
_PACKED: WeakIdKeyDictionary = WeakIdKeyDictionary()
_REORDER = getattr(torch.ops.mkldnn, "_reorder_linear_weight", None)
_SAMPLED = 32  # values per weight compared at every use: one small gather and compare


def fingerprint(t: Tensor) -> tuple:
    """What :func:`same_values` compares: ``t``'s version counter, its storage and the bits of
    32 values spread over all of it (rows and columns alike)."""
    flat = t.detach().reshape(-1)
    index = torch.linspace(0, flat.numel() - 1, min(_SAMPLED, flat.numel()), device=t.device).long()
    return t._version, t.data_ptr(), index, _bits(flat[index])


def same_values(entry: tuple, t: Tensor) -> bool:
    """Whether ``t`` still holds the values it held when :func:`fingerprint` gave ``entry``.

    An in-place op moves the version counter; a new storage moves the pointer; a fused
    optimizer's step (it moves no counter: ``torch.optim.AdamW(fused=True)``) or a write through
    ``.data`` changes the sampled values. A ``.data`` write that misses all 32 samples is not
    seen: code that edits weights must use in-place ops (``copy_``, ``mul_`` under
    ``torch.no_grad()``)."""
    version, pointer, index, bits = entry
    return (version == t._version and pointer == t.data_ptr()
            and torch.equal(bits, _bits(t.detach().reshape(-1)[index])))


def _bits(values: Tensor) -> Tensor:
    # Bit patterns, not values: a NaN equals itself here.
    return values.view(torch.int16 if values.element_size() == 2 else torch.int32).clone()


def packed_weight(weight: Tensor) -> Tensor:
    """``weight`` in oneDNN's blocked layout when it may be cached (see ``_PACKED``), else itself."""
    if weight.requires_grad:
        forget_packed(weight)
        return weight
    if _REORDER is None or weight.is_inference() or weight.dim() != 2 or not weight.is_contiguous():
        return weight
    entry = _PACKED.get(weight)
    if entry is not None and same_values(entry[0], weight):
        return entry[1]
    packed = _REORDER(weight)
    _PACKED[weight] = (fingerprint(weight), packed)
    return packed


def forget_packed(weight: Tensor) -> None:
    """Drop ``weight``'s packed copy (it requires a gradient again, or left the CPU or its
    dtype: the copy cannot serve). Called on every such use, so it costs nothing while no
    weight is packed (training, CUDA)."""
    if _PACKED:
        _PACKED.pop(weight, None)


@torch.library.custom_op(OP_NAME, mutates_args=(), device_types="cpu",
                         schema="(Tensor x, Tensor weight, Tensor? bias, str activation) -> Tensor")
def onednn_linear(x: Tensor, weight: Tensor, bias: Tensor | None, activation: str) -> Tensor:
    """``activation(x @ weight^T + bias)`` by oneDNN, bias and GELU fused into the product.

    Args:
        x: ``(..., in)``, float32 or bfloat16, CPU, any strides.
        weight: ``(out, in)`` in ``x``'s dtype (a transposed view is fine).
        bias: ``(out,)`` in ``x``'s dtype, or ``None``.
        activation: ``"none"`` or ``"gelu"`` (exact erf form).

    Returns:
        ``(..., out)``, contiguous, in ``x``'s dtype.
    """
    if bias is None:
        # A zero bias, not none: oneDNN's inner product without a bias is markedly slower than
        # with one at the backbone's shapes (docs/benchmarks.md, "Backward kernels").
        bias = x.new_zeros(weight.shape[0])
    if isinstance(weight, torch.nn.Parameter):
        # A compiled graph hands the op the model's parameter itself (frozen graphs too): a
        # frozen model keeps its packed weights compiled as in eager.
        weight = packed_weight(weight)
    return torch.ops.mkldnn._linear_pointwise(
        x, weight, bias, activation, [], "none" if activation == "gelu" else ""
    )


@onednn_linear.register_fake
def _fake(x: Tensor, weight: Tensor, bias: Tensor | None, activation: str) -> Tensor:
    # The kernel's output is always a fresh contiguous tensor, whatever the input's strides.
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def _setup_context(ctx, inputs, output) -> None:  # noqa: ANN001 - torch's autograd context
    x, weight, bias, activation = inputs
    ctx.save_for_backward(x, weight, bias)
    ctx.activation = activation


def _backward(ctx, grad: Tensor):  # noqa: ANN001, ANN202 - torch's autograd context
    """Gradients as ``F.linear``'s, in products that are themselves differentiable (this op and
    aten's), so a double backward works."""
    x, weight, bias = ctx.saved_tensors
    if ctx.activation == "gelu":
        # GELU's backward needs the pre-activation, which the fused kernel does not keep:
        # recompute it. ``ops.linear`` never asks for this (with gradients it calls the op
        # without the activation and applies ``F.gelu`` after it); it is here so that the op
        # is right for any caller.
        grad = torch.ops.aten.gelu_backward(grad, onednn_linear(x, weight, bias, "none"))
    rows = grad.reshape(-1, grad.shape[-1])
    grad_x = grad_w = grad_b = None
    if ctx.needs_input_grad[0]:
        grad_x = onednn_linear(grad, weight.t(), None, "none")
    if ctx.needs_input_grad[1]:
        grad_w = rows.t() @ x.reshape(-1, x.shape[-1])
    if bias is not None and ctx.needs_input_grad[2]:
        grad_b = rows.sum(0)
    return grad_x, grad_w, grad_b, None


onednn_linear.register_autograd(_backward, setup_context=_setup_context)

