"""``ops.linear`` under ``torch.compile``: the compiled graph calls oneDNN's fused kernel through
the ``clusterformer::onednn_linear`` custom op (``ops/linear_op.py``) instead of inductor's
decomposition (which made compiled tiny slower than eager), with eager's numbers and gradients;
export and function transforms still trace plain aten ops.

On the code before the custom op the op tests fail (there was no ``ops/linear_op.py``) and so
do the "calls the op" tests (the compiled code called ``addmm``/``mm``). Four tests guard the
places where the op must not be used and pass on the old code by design (it never used the op):
float64 (no fused kernel), ``vmap`` and ``torch.func.grad`` under compile (a custom op has no
``grad`` rule), and ``torch.export`` (ONNX Runtime knows no custom op); each fails if its
fallback is removed.
"""

from __future__ import annotations

import importlib

import pytest
import torch
from linear_kit import rand, reference, rel_diff
from torch import Tensor
from torch._inductor.utils import run_and_get_code

linear_module = importlib.import_module("clusterformer.ops.fused_linear")
linear = linear_module.linear
needs_onednn = pytest.mark.skipif(not linear_module._ONEDNN, reason="torch built without oneDNN")
pytestmark = needs_onednn

RTOL = 1e-5  # float32: two kernels' rounding (as tests/test_linear_op.py)
RTOL_BF16 = 1e-2  # bfloat16 rounding on both sides (as tests/test_linear_autocast.py)
OP = "torch.ops.clusterformer.onednn_linear"


def compiled_run(fn, *args):  # noqa: ANN001, ANN202
    """``fn(*args)`` under a fresh ``torch.compile(fullgraph=True)``, and inductor's code."""
    torch._dynamo.reset()
    out, code = run_and_get_code(torch.compile(fn, fullgraph=True), *args)
    return out, "\n".join(code)


# --- the op itself ------------------------------------------------------------------------------


# Two of the four (activation, bias) pairs: each opcheck traces the op several ways.
@pytest.mark.parametrize(("activation", "bias"), [("none", True), ("gelu", False)],
                         ids=["bias-none", "no-bias-gelu"])
def test_op_passes_torch_library_opcheck(activation, bias):
    # opcheck: the schema, the fake implementation's shapes/strides against the real kernel's,
    # the autograd registration and the AOT-dispatch path compile uses.
    from clusterformer.ops.linear_op import onednn_linear

    x = rand(0, 2, 3, 4, 8).requires_grad_()
    weight, b = rand(1, 6, 8).requires_grad_(), (rand(2, 6).requires_grad_() if bias else None)
    torch.library.opcheck(onednn_linear, (x, weight, b, activation))


@pytest.mark.parametrize("activation", ["none", "gelu"])
def test_op_gradients_equal_f_linear(activation):
    # Including GELU's, which the op recomputes from the pre-activation; a non-contiguous input.
    from clusterformer.ops.linear_op import onednn_linear

    x = rand(0, 8, 3, 5).movedim(0, -1).requires_grad_()
    weight, bias = rand(1, 4, 8).requires_grad_(), rand(2, 4).requires_grad_()
    cotangent = rand(3, 3, 5, 4)
    got = torch.autograd.grad(onednn_linear(x, weight, bias, activation), (x, weight, bias),
                              cotangent)
    want = torch.autograd.grad(reference(x, weight, bias, activation), (x, weight, bias),
                               cotangent)
    for g, w in zip(got, want, strict=True):
        assert rel_diff(g, w) <= RTOL


# --- ops.linear compiled ------------------------------------------------------------------------


@pytest.mark.parametrize("activation", ["none", "gelu"])
def test_compiled_inference_calls_the_op(activation):
    # The backbone's shape: a (B, H, W, C) map with a strided channel axis.
    x = rand(0, 2, 8, 4, 3).permute(0, 2, 3, 1)
    weight, bias = rand(1, 6, 8), rand(2, 6)
    with torch.no_grad():
        got, code = compiled_run(lambda x: linear(x, weight, bias, activation=activation), x)
    assert OP in code
    assert rel_diff(got, reference(x, weight, bias, activation)) <= RTOL


def test_compiled_frozen_module_calls_the_op():
    # As cf eval / cf predict / cf benchmark --compile compile a model: inductor with freezing,
    # where the weights become constants of the graph.
    from clusterformer.engine.compiled import compile_model

    class Mlp(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.fc2 = torch.nn.Linear(8, 16), torch.nn.Linear(16, 8)

        def forward(self, x: Tensor) -> Tensor:
            hidden = linear(x, self.fc1.weight, self.fc1.bias, activation="gelu")
            return linear(hidden, self.fc2.weight, self.fc2.bias)

    torch.manual_seed(0)
    model = Mlp().eval()
    x = rand(0, 2, 5, 5, 8)
    torch._dynamo.reset()
    with torch.no_grad():
        got, code = run_and_get_code(compile_model(model, inference=True), x)
        want = model(x)
    assert "\n".join(code).count(OP) >= 2
    assert rel_diff(got, want) <= RTOL


@pytest.mark.parametrize(("activation", "bias"), [("none", False), ("gelu", True)],
                         ids=["no-bias-none", "bias-gelu"])
def test_compiled_training_calls_the_op_and_gradients_match(activation, bias):
    x = rand(0, 2, 3, 4, 8).requires_grad_()
    weight = rand(1, 6, 8).requires_grad_()
    b = rand(2, 6).requires_grad_() if bias else None
    inputs = [t for t in (x, weight, b) if t is not None]
    got, code = compiled_run(lambda x, w, b: linear(x, w, b, activation=activation), x, weight, b)
    assert OP in code
    want = reference(x, weight, b, activation)
    assert rel_diff(got, want) <= RTOL
    cotangent = rand(3, 2, 3, 4, 6)
    for g, w in zip(torch.autograd.grad(got, inputs, cotangent),
                    torch.autograd.grad(want, inputs, cotangent), strict=True):
        assert rel_diff(g, w) <= RTOL


@pytest.mark.parametrize("grad", [False, True], ids=["no-grad", "grad"])
def test_compiled_bf16_autocast_calls_the_op_in_bf16(grad):
    # Under CPU bf16 autocast, as eager: the op multiplies in bfloat16 and float32 parameters
    # get float32 gradients.
    x = rand(0, 4, 7, 32).requires_grad_(grad)
    weight = (rand(1, 24, 32) / 32**0.5).requires_grad_(grad)
    bias = rand(2, 24).requires_grad_(grad)

    def fn(x, weight, bias):  # noqa: ANN001, ANN202
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return linear(x, weight, bias, activation="gelu")

    with torch.set_grad_enabled(grad):
        got, code = compiled_run(fn, x, weight, bias)
        want = fn(x, weight, bias)  # eager, bf16 autocast
    assert OP in code and got.dtype == torch.bfloat16
    assert rel_diff(got, want) <= RTOL_BF16
    if grad:
        cotangent = rand(3, 4, 7, 24)
        for g, w in zip(torch.autograd.grad(got, (x, weight, bias), cotangent),
                        torch.autograd.grad(want, (x, weight, bias), cotangent), strict=True):
            assert g.dtype == torch.float32
            assert rel_diff(g, w) <= 2 * RTOL_BF16  # weight gradients: a longer bf16 sum


def test_compiled_float64_does_not_call_the_op():
    # Only float32/bfloat16 have the fused kernel; other dtypes stay F.linear, compiled or not.
    x, weight = rand(0, 3, 5).double(), rand(1, 4, 5).double()
    with torch.no_grad():
        got, code = compiled_run(lambda x: linear(x, weight, activation="gelu"), x)
    assert OP not in code
    assert rel_diff(got, reference(x, weight, None, "gelu")) <= 1e-12


def test_compiled_vmap_matches():
    x, weight, bias = rand(0, 4, 3, 6), rand(1, 5, 6), rand(2, 5)
    fn = torch.func.vmap(lambda row: linear(row, weight, bias, activation="gelu"))
    with torch.no_grad():
        got, _ = compiled_run(fn, x)
    assert rel_diff(got, reference(x, weight, bias, "gelu")) <= RTOL


def test_compiled_func_grad_falls_back():
    # Custom ops have no torch.func.grad rule: traced under a transform, linear must stay
    # F.linear, or the fullgraph compile fails.
    x, weight, bias = rand(0, 4, 6), rand(1, 5, 6), rand(2, 5)

    def loss(weight, bias):  # noqa: ANN001, ANN202
        return linear(x, weight, bias, activation="gelu").square().sum()

    got, _ = compiled_run(torch.func.grad(loss, argnums=(0, 1)), weight, bias)
    w, b = weight.clone().requires_grad_(), bias.clone().requires_grad_()
    want = torch.autograd.grad(reference(x, w, b, "gelu").square().sum(), (w, b))
    for g, expected in zip(got, want, strict=True):
        assert rel_diff(g, expected) <= RTOL


def test_export_traces_aten_linear():
    # torch.export (and so ONNX export) must see standard ops: ONNX Runtime has no kernel for
    # the custom op.
    class Mlp(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = torch.nn.Linear(8, 6)

        def forward(self, x: Tensor) -> Tensor:
            return linear(x, self.fc.weight, self.fc.bias, activation="gelu")

    program = torch.export.export(Mlp().eval(), (rand(0, 2, 3, 8),), strict=False)
    targets = [str(node.target) for node in program.graph.nodes if node.op == "call_function"]
    assert not any("clusterformer" in target for target in targets), targets
    assert any("linear" in target for target in targets), targets
