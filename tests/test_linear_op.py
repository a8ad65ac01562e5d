"""``clusterformer.ops.linear`` (``ops/fused_linear.py``): the oneDNN fast path gives F.linear's
numbers and gradients, and steps aside where it cannot serve (function transforms, dispatch
modes, other dtypes). Under ``torch.compile`` it is a custom op: tests/test_linear_compiled.py."""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor

# The module, for its private switches and to spy on the kernel (``clusterformer.ops.linear`` is
# the function).
linear_module = importlib.import_module("clusterformer.ops.fused_linear")
linear = linear_module.linear

ONEDNN = linear_module._ONEDNN
needs_onednn = pytest.mark.skipif(not ONEDNN, reason="torch built without oneDNN")
# max |got - want| / max(max |want|, 0.1): fp32 rounding of two different kernels. The floor
# makes it an absolute 1e-6 for outputs below 0.1: oneDNN's fused GELU is off by ~4e-7
# absolute, which is 1.5e-5 of an output of 0.03.
RTOL = 1e-5
# Above this many rows the weight gradient is BLAS's, up to it oneDNN's.
LARGE_ROWS = linear_module._ONEDNN_MAX_ROWS_FOR_WEIGHT_GRAD


def rel_diff(got: Tensor, want: Tensor) -> float:
    return ((got.float() - want.float()).abs().max() / want.float().abs().max().clamp_min(0.1)).item()


def rand(seed: int, *shape: int, dtype: torch.dtype = torch.float32) -> Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def reference(x: Tensor, weight: Tensor, bias: Tensor | None, activation: str) -> Tensor:
    out = F.linear(x, weight, bias)
    return F.gelu(out) if activation == "gelu" else out


def make_input(seed: int, lead: tuple[int, ...], dim: int, layout: str) -> Tensor:
    """``(*lead, dim)`` float32, contiguous or as a strided view (every element distinct)."""
    if layout == "contiguous":
        return rand(seed, *lead, dim)
    if layout == "sliced":  # the channel dimension has stride 2
        return rand(seed, *lead, 2 * dim)[..., ::2]
    # "transposed": channels outermost in memory
    return rand(seed, dim, *lead).movedim(0, -1)


@contextlib.contextmanager
def onednn_calls() -> Iterator[list[int]]:
    """Count the calls into the oneDNN kernel (forward and backward), to know the fast path ran."""
    calls = [0]
    original = linear_module._onednn_linear

    def spy(*args, **kwargs):
        calls[0] += 1
        return original(*args, **kwargs)

    linear_module._onednn_linear = spy
    try:
        yield calls
    finally:
        linear_module._onednn_linear = original


# --- values, no gradient (the fused oneDNN kernel) ----------------------------------------------


@needs_onednn
@settings(max_examples=40, deadline=None)
@given(lead=st.lists(st.integers(1, 5), min_size=1, max_size=3).map(tuple),
       dims=st.tuples(st.integers(1, 12), st.integers(1, 12)),
       bias=st.booleans(), activation=st.sampled_from(["none", "gelu"]),
       layout=st.sampled_from(["contiguous", "sliced", "transposed"]), seed=st.integers(0, 2**16))
def test_no_grad_values_equal_f_linear(lead, dims, bias, activation, layout, seed):
    in_dim, out_dim = dims
    x = make_input(seed, lead, in_dim, layout)
    weight = rand(seed + 1, out_dim, in_dim)
    b = rand(seed + 2, out_dim) if bias else None
    with torch.no_grad(), onednn_calls() as calls:
        got = linear(x, weight, b, activation=activation)
    assert calls[0] == 1, "the no-grad float32 call did not take the oneDNN path"
    want = reference(x, weight, b, activation)
    assert got.shape == want.shape == (*lead, out_dim)
    assert rel_diff(got, want) <= RTOL


@needs_onednn
def test_no_grad_gelu_is_the_exact_erf_form():
    # The tanh approximation differs from erf GELU by up to ~1e-3 around |x| ~ 2; the fused
    # kernel must use the erf form F.gelu uses by default.
    x = torch.linspace(-4, 4, 401).unsqueeze(-1)
    weight = torch.ones(1, 1)
    with torch.no_grad():
        got = linear(x, weight, activation="gelu")
    assert rel_diff(got, F.gelu(x)) <= RTOL
    assert rel_diff(F.gelu(x, approximate="tanh"), F.gelu(x)) > 10 * RTOL  # the check can tell


@needs_onednn
def test_no_grad_bfloat16_close_to_float32():
    x, weight, bias = rand(0, 4, 7, 32), rand(1, 24, 32) / 32**0.5, rand(2, 24)
    want = reference(x, weight, bias, "gelu")
    with torch.no_grad(), onednn_calls() as calls:
        got = linear(x.bfloat16(), weight.bfloat16(), bias.bfloat16(), activation="gelu")
    assert calls[0] == 1 and got.dtype == torch.bfloat16
    # bf16 keeps 8 bits of mantissa: a few 1e-3 relative is its rounding, 3e-2 is a wrong result.
    assert rel_diff(got, want) <= 3e-2


def test_float64_takes_the_plain_path_and_is_exact():
    x, weight, bias = (rand(i, *shape, dtype=torch.float64) for i, shape in
                       enumerate([(3, 4, 5), (6, 5), (6,)]))
    with torch.no_grad(), onednn_calls() as calls:
        got = linear(x, weight, bias, activation="gelu")
    assert calls[0] == 0
    assert torch.equal(got, F.gelu(F.linear(x, weight, bias)))


def test_unknown_activation_raises_value_error():
    with pytest.raises(ValueError, match="unknown activation 'relu'"):
        linear(torch.randn(2, 3), torch.randn(4, 3), activation="relu")  # type: ignore[arg-type]


# --- gradients (the autograd function) --------------------------------------------------------


GRAD_CASES = [
    # (leading shape, oneDNN calls: forward + input gradient [+ weight gradient])
    pytest.param((3, 5), 3, id="few-rows-onednn-weight-grad"),
    pytest.param((2, LARGE_ROWS // 2 + 3), 2, id="many-rows-blas-weight-grad"),
]


@needs_onednn
@pytest.mark.parametrize(("lead", "onednn_kernels"), GRAD_CASES)
@pytest.mark.parametrize("activation", ["none", "gelu"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
# Both orientations of the oneDNN weight gradient: fewer outputs than inputs, and more.
@pytest.mark.parametrize(("in_dim", "out_dim"), [(12, 10), (6, 14)], ids=["narrow-out", "wide-out"])
def test_gradients_equal_f_linear(lead, onednn_kernels, activation, bias, in_dim, out_dim):
    x = rand(0, *lead, in_dim).requires_grad_()
    weight = rand(1, out_dim, in_dim).requires_grad_()
    b = rand(2, out_dim).requires_grad_() if bias else None
    inputs = [t for t in (x, weight, b) if t is not None]
    cotangent = rand(3, *lead, out_dim)  # a random one: a sum would hide row/column mix-ups
    with onednn_calls() as calls:
        out = linear(x, weight, b, activation=activation)
        got = torch.autograd.grad(out, inputs, cotangent)
    assert calls[0] == onednn_kernels, "forward/backward did not take the expected kernels"
    want_out = reference(x, weight, b, activation)
    want = torch.autograd.grad(want_out, inputs, cotangent)
    assert rel_diff(out, want_out) <= RTOL
    for name, g, w in zip(["x", "weight", "bias"], got, want, strict=False):
        assert g.shape == w.shape, name
        assert rel_diff(g, w) <= RTOL, name


@needs_onednn
@pytest.mark.parametrize("lead", [(3, 5), (2, LARGE_ROWS // 2 + 3)], ids=["small", "large"])
@pytest.mark.parametrize("wrt", ["x", "weight", "bias"])
def test_gradient_of_one_input_only(lead, wrt):
    # needs_input_grad picks the branches: frozen weights (fine-tuning a head) or a frozen input.
    tensors = {"x": rand(0, *lead, 6), "weight": rand(1, 4, 6), "bias": rand(2, 4)}
    tensors[wrt].requires_grad_()
    cotangent = rand(3, *lead, 4)
    out = linear(tensors["x"], tensors["weight"], tensors["bias"])
    assert type(out.grad_fn).__name__ == "_OneDnnLinearBackward"
    (got,) = torch.autograd.grad(out, tensors[wrt], cotangent)
    (want,) = torch.autograd.grad(
        F.linear(tensors["x"], tensors["weight"], tensors["bias"]), tensors[wrt], cotangent)
    assert rel_diff(got, want) <= RTOL


@needs_onednn
def test_gradient_of_a_non_contiguous_input():
    x = make_input(0, (4, 3), 8, "transposed").requires_grad_()
    weight = rand(1, 5, 8).requires_grad_()
    cotangent = rand(2, 4, 3, 5)
    got = torch.autograd.grad(linear(x, weight, activation="gelu"), (x, weight), cotangent)
    want = torch.autograd.grad(reference(x, weight, None, "gelu"), (x, weight), cotangent)
    for g, w in zip(got, want, strict=True):
        assert rel_diff(g, w) <= RTOL


def test_double_backward_equals_f_linear():
    """A backward with create_graph stays differentiable (it was once_differentiable, so second
    derivatives were silently None)."""
    x, weight = rand(0, 5, 8).requires_grad_(), rand(1, 6, 8).requires_grad_()

    def second_order(fn):
        (gx,) = torch.autograd.grad(fn(x, weight).square().sum(), x, create_graph=True)
        return torch.autograd.grad(gx.square().sum(), (x, weight), allow_unused=True)

    got, want = second_order(linear), second_order(F.linear)
    for g, w in zip(got, want, strict=True):
        assert g is not None and rel_diff(g, w) <= RTOL


# --- function transforms fall back to F.linear; compiled, it gives eager's numbers -----------


def test_package_exports_the_same_function():
    from clusterformer.ops import linear as exported

    assert exported is linear


def test_flop_counter_mode_sees_the_product():
    # Under a Python dispatch mode the plain aten op runs, so FlopCounterMode counts its FLOPs.
    from torch.utils.flop_counter import FlopCounterMode

    x, weight, bias = rand(0, 4, 6, 8), rand(1, 5, 8), rand(2, 5)
    with torch.no_grad(), onednn_calls() as calls, FlopCounterMode(display=False) as counter:
        got = linear(x, weight, bias, activation="gelu")
    assert calls[0] == 0
    assert counter.get_total_flops() == 2 * 4 * 6 * 8 * 5
    assert rel_diff(got, reference(x, weight, bias, "gelu")) <= RTOL


def test_vmap_falls_back_and_matches():
    x, weight, bias = rand(0, 4, 3, 6), rand(1, 5, 6), rand(2, 5)
    with onednn_calls() as calls:
        got = torch.func.vmap(lambda row: linear(row, weight, bias, activation="gelu"))(x)
    assert calls[0] == 0  # the oneDNN op has no batching rule: it must not be reached
    assert rel_diff(got, reference(x, weight, bias, "gelu")) <= RTOL


def test_func_grad_falls_back_and_matches():
    x, weight, bias = rand(0, 4, 6), rand(1, 5, 6), rand(2, 5)

    def loss(weight, bias):
        return linear(x, weight, bias, activation="gelu").square().sum()

    got = torch.func.grad(loss, argnums=(0, 1))(weight, bias)
    w, b = weight.clone().requires_grad_(), bias.clone().requires_grad_()
    want = torch.autograd.grad(reference(x, w, b, "gelu").square().sum(), (w, b))
    for g, expected in zip(got, want, strict=True):
        assert rel_diff(g, expected) <= RTOL


@pytest.mark.parametrize("grad", [False, True], ids=["no-grad", "grad"])
def test_compile_fullgraph_matches_eager(grad):
    torch._dynamo.reset()
    x = rand(0, 2, 3, 8).requires_grad_(grad)
    weight, bias = rand(1, 6, 8).requires_grad_(grad), rand(2, 6).requires_grad_(grad)

    def fn(x, weight, bias):
        return linear(x, weight, bias, activation="gelu")

    compiled = torch.compile(fn, fullgraph=True, backend="inductor")
    with torch.set_grad_enabled(grad):
        got, want = compiled(x, weight, bias), reference(x, weight, bias, "gelu")
    assert rel_diff(got, want) <= RTOL
    if grad:
        cotangent = rand(3, 2, 3, 6)
        for g, w in zip(torch.autograd.grad(got, (x, weight, bias), cotangent),
                        torch.autograd.grad(want, (x, weight, bias), cotangent), strict=True):
            assert rel_diff(g, w) <= RTOL
