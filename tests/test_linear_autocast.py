"""``clusterformer.ops.linear`` under autocast: on a CPU with bfloat16 the oneDNN path runs in
bfloat16 (it used to take the float32 weights and multiply in float32, so the MLPs missed
autocast's speed-up), gives ``F.linear``'s numbers under autocast, sends float32 gradients to the
float32 parameters, and casts each parameter once per change, not once per call. Any other
autocast (float16 on a CPU, a GPU's) still goes through ``F.linear``, and float32 is untouched."""

from __future__ import annotations

import contextlib
import gc
import importlib
from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F
from linear_kit import rand, reference, rel_diff
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary

linear_module = importlib.import_module("clusterformer.ops.fused_linear")
linear = linear_module.linear

needs_onednn = pytest.mark.skipif(not linear_module._ONEDNN, reason="torch built without oneDNN")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
BF16 = torch.bfloat16
# max |got - want| / max(max |want|, 0.1). Both sides multiply bfloat16 numbers with float32
# accumulation and round the result to bfloat16, whose step is 2^-8 = 3.9e-3 of a value: 1e-2
# allows that rounding on either side plus a different summation order; a wrong operand or a
# missing bias is off by far more. Weight gradients sum over all rows (a longer reduction): 2e-2.
RTOL = 1e-2
RTOL_WEIGHT_GRAD = 2e-2


@contextlib.contextmanager
def onednn_inputs() -> Iterator[list[torch.dtype]]:
    """The dtype of every input handed to the oneDNN kernel (forward and backward)."""
    dtypes: list[torch.dtype] = []
    original = linear_module._onednn_linear

    def spy(x, weight, *args, **kwargs):
        dtypes.append(x.dtype)
        assert weight.dtype == x.dtype
        return original(x, weight, *args, **kwargs)

    linear_module._onednn_linear = spy
    try:
        yield dtypes
    finally:
        linear_module._onednn_linear = original


def cpu_autocast(dtype: torch.dtype = BF16):
    return torch.autocast("cpu", dtype=dtype)


def params(seed: int, out_dim: int, in_dim: int, bias: bool = True) -> tuple[Tensor, Tensor | None]:
    weight = (rand(seed, out_dim, in_dim) / in_dim**0.5).requires_grad_()
    return weight, rand(seed + 1, out_dim).requires_grad_() if bias else None


# --- values and gradients ---------------------------------------------------------------------


@needs_onednn
@pytest.mark.parametrize("activation", ["none", "gelu"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_no_grad_runs_in_bf16_and_matches_f_linear(activation, bias):
    x = rand(0, 3, 5, 24)
    weight, b = params(1, 16, 24, bias)
    with torch.no_grad(), cpu_autocast(), onednn_inputs() as dtypes:
        got = linear(x, weight, b, activation=activation)
        want = reference(x, weight, b, activation)
    # The old path multiplied in float32 and returned float32.
    assert dtypes == [BF16] and got.dtype == want.dtype == BF16
    assert rel_diff(got, want) <= RTOL


@needs_onednn
@pytest.mark.parametrize("activation", ["none", "gelu"])
# Few rows: oneDNN's weight gradient; many: BLAS's (both in bf16 now).
@pytest.mark.parametrize("rows", [(3, 5), (2, linear_module._ONEDNN_MAX_ROWS_FOR_WEIGHT_GRAD)],
                         ids=["few-rows", "many-rows"])
def test_gradients_match_f_linear_and_reach_fp32_params_in_fp32(activation, rows):
    x = rand(0, *rows, 24).requires_grad_()
    weight, bias = params(1, 16, 24)
    cotangent = rand(3, *rows, 16).to(BF16)
    with onednn_inputs() as dtypes:
        with cpu_autocast():
            out = linear(x, weight, bias, activation=activation)
        got = torch.autograd.grad(out, (x, weight, bias), cotangent)
    with cpu_autocast():
        want_out = reference(x, weight, bias, activation)
    want = torch.autograd.grad(want_out, (x, weight, bias), cotangent)
    assert set(dtypes) == {BF16} and len(dtypes) >= 2, "forward and input gradient by oneDNN"
    assert out.dtype == BF16 and rel_diff(out, want_out) <= RTOL
    for name, g, w, tol in zip(["x", "weight", "bias"], got, want,
                               [RTOL, RTOL_WEIGHT_GRAD, RTOL_WEIGHT_GRAD], strict=True):
        assert g.dtype == w.dtype == torch.float32, name  # as autocast gives them
        assert rel_diff(g, w) <= tol, name


@needs_onednn
def test_backward_inside_the_autocast_region_gives_the_same_gradients():
    # A backward called inside ``with autocast`` must not recast the saved bf16 tensors.
    x = rand(0, 4, 6, 24)
    weight, bias = params(1, 16, 24)
    cotangent = rand(2, 4, 6, 16).to(BF16)
    with cpu_autocast():
        inside = torch.autograd.grad(linear(x, weight, bias, activation="gelu"), (weight, bias),
                                     cotangent)
        out = linear(x, weight, bias, activation="gelu")
    outside = torch.autograd.grad(out, (weight, bias), cotangent)
    for a, b in zip(inside, outside, strict=True):
        assert torch.equal(a, b)


@needs_onednn
def test_double_backward_reaches_the_fp32_weight():
    # The cached bf16 copy has no edge to its parameter: create_graph must cast afresh.
    x = rand(0, 5, 8).requires_grad_()
    weight, _ = params(1, 6, 8, bias=False)

    def second_order(fn):
        with cpu_autocast():
            (gx,) = torch.autograd.grad(fn(x, weight).float().square().sum(), x,
                                        create_graph=True)
        return torch.autograd.grad(gx.square().sum(), (x, weight))

    got, want = second_order(linear), second_order(F.linear)
    for g, w in zip(got, want, strict=True):
        assert g.dtype == w.dtype == torch.float32
        assert rel_diff(g, w) <= RTOL_WEIGHT_GRAD


# --- one cast per change of a parameter -------------------------------------------------------


class CountingCasts(WeakIdKeyDictionary):
    """``_CASTS`` that counts the copies stored (one per cast of a cacheable parameter)."""

    def __init__(self) -> None:
        super().__init__()
        self.stored = 0

    def __setitem__(self, key, value) -> None:
        self.stored += 1
        super().__setitem__(key, value)


@pytest.fixture
def casts(monkeypatch) -> CountingCasts:
    counting = CountingCasts()
    monkeypatch.setattr(linear_module, "_CASTS", counting)
    return counting


@needs_onednn
def test_inference_casts_each_parameter_once_until_it_changes(casts):
    x = rand(0, 4, 24)
    weight, bias = params(1, 16, 24)
    with torch.no_grad(), cpu_autocast():
        first = linear(x, weight, bias)
        for _ in range(3):
            assert torch.equal(linear(x, weight, bias), first)
        assert casts.stored == 2  # weight and bias, once
        weight.mul_(-1.0)  # an in-place update moves the version counter
        got = linear(x, weight, bias)
        assert casts.stored == 3
        assert rel_diff(got, F.linear(x, weight, bias)) <= RTOL


@needs_onednn
def test_a_parameter_read_three_times_in_a_step_is_cast_once(casts):
    # The recurrent clustering reads its query weight at every iteration.
    x = rand(0, 4, 16)
    weight, bias = params(1, 16, 16)
    optimizer = torch.optim.SGD([weight, bias], lr=0.1)
    for step in range(3):
        with cpu_autocast():
            out = x
            for _ in range(3):
                out = linear(out, weight, bias, activation="gelu")
        out.float().sum().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        assert casts.stored == 2 * (step + 1)


@needs_onednn
@pytest.mark.parametrize("optimizer", ["for-loop", "foreach", "fused"])
def test_training_steps_see_the_updated_weights(optimizer):
    # A fused optimizer writes the parameters without moving their version counter: the copies
    # must be dropped by the backward, or every later step would multiply by the first weights.
    torch.manual_seed(0)
    x = rand(0, 8, 12)
    weight, bias = params(1, 6, 12)
    kwargs = {"for-loop": {"foreach": False}, "foreach": {"foreach": True},
              "fused": {"fused": True}}[optimizer]
    opt = torch.optim.AdamW([weight, bias], lr=0.05, **kwargs)
    for _ in range(3):
        with cpu_autocast():
            out = linear(x, weight, bias)
            want = F.linear(x, weight, bias)
        assert rel_diff(out, want) <= RTOL
        out.float().square().sum().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


@needs_onednn
def test_a_copy_made_under_inference_mode_serves_a_later_backward():
    x = rand(0, 4, 24)
    weight, bias = params(1, 16, 24)
    with torch.inference_mode(), cpu_autocast():
        linear(x, weight, bias)
    with cpu_autocast():
        out = linear(x, weight, bias)
    (grad,) = torch.autograd.grad(out.float().sum(), weight)  # no "inference tensor" error
    assert grad.dtype == torch.float32


@needs_onednn
def test_copies_die_with_their_parameter(casts):
    weight, bias = params(1, 16, 24)
    with torch.no_grad(), cpu_autocast():
        linear(rand(0, 2, 24), weight, bias)
    assert len(casts) == 2
    del weight, bias
    gc.collect()
    assert len(casts) == 0


# --- what stays as it was ---------------------------------------------------------------------


@needs_onednn
@pytest.mark.parametrize("grad", [False, True], ids=["no-grad", "grad"])
def test_float32_without_autocast_is_the_plain_onednn_kernel_bit_for_bit(grad, casts):
    # A guard, not a fix: float32 outside autocast takes the same kernel with the same operands
    # as before the change (so it passes on the old code too), and caches nothing.
    x = rand(0, 3, 5, 24)
    weight, bias = params(1, 16, 24)
    with torch.set_grad_enabled(grad), onednn_inputs() as dtypes:
        got = linear(x, weight, bias, activation="gelu")
    direct = torch.ops.mkldnn._linear_pointwise(x, weight.detach(), bias.detach(), "gelu", [],
                                                "none")
    if grad:
        direct = torch.ops.mkldnn._linear_pointwise(x, weight.detach(), bias.detach(), "none",
                                                    [], "")
        direct = F.gelu(direct)
    assert dtypes == [torch.float32] and torch.equal(got, direct) and len(casts) == 0


def test_cpu_float16_autocast_goes_through_f_linear():
    x = rand(0, 3, 24)
    weight, bias = params(1, 16, 24)
    with torch.no_grad(), cpu_autocast(torch.float16), onednn_inputs() as dtypes:
        got = linear(x, weight, bias)
        want = F.linear(x, weight, bias)
    assert dtypes == [] and got.dtype == torch.float16 and torch.equal(got, want)


def test_non_cpu_tensors_never_reach_onednn_even_under_cpu_autocast():
    # The device test comes first: a GPU (here the meta device) goes to F.linear, which the
    # device's own autocast handles.
    x, weight = torch.empty(3, 24, device="meta"), torch.empty(16, 24, device="meta")
    with cpu_autocast(), onednn_inputs() as dtypes:
        got = linear(x, weight)
    assert dtypes == [] and got.shape == (3, 16) and got.device.type == "meta"


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_autocast_is_f_linear_under_autocast(dtype):
    x = rand(0, 4, 24).cuda().requires_grad_()
    weight, bias = (t.detach().cuda().requires_grad_() for t in params(1, 16, 24))
    with torch.autocast("cuda", dtype=dtype), onednn_inputs() as dtypes:
        got = linear(x, weight, bias, activation="gelu")
        want = reference(x, weight, bias, "gelu")
    assert dtypes == [] and got.dtype == dtype and torch.equal(got, want)
    got_grads = torch.autograd.grad(got.float().sum(), (x, weight, bias))
    want_grads = torch.autograd.grad(want.float().sum(), (x, weight, bias))
    for g, w in zip(got_grads, want_grads, strict=True):
        assert g.dtype == torch.float32 and torch.equal(g, w)


# --- transforms under autocast ----------------------------------------------------------------


def test_vmap_under_autocast_falls_back_to_f_linear():
    # Whatever autocast does to F.linear under vmap (in torch 2.13 it leaves it in float32), the
    # fallback does the same.
    x = rand(0, 4, 3, 24)
    weight, bias = params(1, 16, 24)
    with torch.no_grad(), cpu_autocast(), onednn_inputs() as dtypes:
        got = torch.func.vmap(lambda row: linear(row, weight, bias, activation="gelu"))(x)
        want = torch.func.vmap(lambda row: reference(row, weight, bias, "gelu"))(x)
    assert dtypes == [] and got.dtype == want.dtype and torch.equal(got, want)


def test_func_grad_wrt_weights_falls_back_to_f_linear():
    # The transform wraps the weight, not the input: every operand is checked (a wrapped weight
    # alone used to reach the oneDNN kernel).
    x = rand(0, 4, 24)
    weight, bias = (t.detach() for t in params(1, 16, 24))

    def loss(weight, bias):
        return linear(x, weight, bias, activation="gelu").float().square().sum()

    with cpu_autocast(), onednn_inputs() as dtypes:
        got = torch.func.grad(loss, argnums=(0, 1))(weight, bias)
    w, b = weight.clone().requires_grad_(), bias.clone().requires_grad_()
    with cpu_autocast():
        want = torch.autograd.grad(reference(x, w, b, "gelu").float().square().sum(), (w, b))
    assert dtypes == []
    for g, expected in zip(got, want, strict=True):
        assert g.dtype == torch.float32 and torch.equal(g, expected)


@pytest.mark.parametrize("grad", [False, True], ids=["no-grad", "grad"])
def test_compile_fullgraph_under_autocast_matches_f_linear(grad):
    torch._dynamo.reset()
    x = rand(0, 2, 3, 24)
    weight, bias = (t.detach().requires_grad_(grad) for t in params(1, 16, 24))

    def fn(x, weight, bias):
        return linear(x, weight, bias, activation="gelu")

    compiled = torch.compile(fn, fullgraph=True, backend="inductor")
    with torch.set_grad_enabled(grad), cpu_autocast():
        got, want = compiled(x, weight, bias), reference(x, weight, bias, "gelu")
    assert got.dtype == BF16 and rel_diff(got, want) <= RTOL
    if grad:
        cotangent = rand(3, 2, 3, 16).to(BF16)
        for g, w in zip(torch.autograd.grad(got, (weight, bias), cotangent),
                        torch.autograd.grad(want, (weight, bias), cotangent), strict=True):
            assert g.dtype == torch.float32 and rel_diff(g, w) <= RTOL_WEIGHT_GRAD


# --- the model ------------------------------------------------------------------------------------


@needs_onednn
def test_every_oneDNN_product_of_a_model_step_is_bf16_under_autocast(monkeypatch):
    # ... except the clustering recurrence's own projections, which the op runs in float32
    # under autocast (docs/benchmarks.md, "bf16 training on the CPU").
    import clusterformer.models.mixer as mixer
    from clusterformer.models import create_model

    inside: list[bool] = []
    recurrence = mixer.recurrent_cross_attention_clustering

    def marked(*args, **kwargs):
        inside.append(True)
        try:
            return recurrence(*args, **kwargs)
        finally:
            inside.pop()

    monkeypatch.setattr(mixer, "recurrent_cross_attention_clustering", marked)
    torch.manual_seed(0)
    model = create_model("clusterformer-nano", num_classes=5)
    images = torch.randn(2, 3, 64, 64)
    with onednn_inputs() as dtypes:
        spy = linear_module._onednn_linear
        forward: list[tuple[torch.dtype, bool]] = []

        def flagged(x, *args, **kwargs):
            forward.append((x.dtype, bool(inside)))
            return spy(x, *args, **kwargs)

        linear_module._onednn_linear = flagged  # onednn_inputs restores the original
        with cpu_autocast():
            logits = model(images)
        linear_module._onednn_linear = spy
        backward_from = len(dtypes)
        F.cross_entropy(logits.float(), torch.tensor([1, 3])).backward()
    assert {dtype for dtype, within in forward if not within} == {BF16}
    assert {dtype for dtype, within in forward if within} == {torch.float32}
    assert BF16 in dtypes[backward_from:]
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(g.dtype == torch.float32 and g.isfinite().all() for g in grads)
