"""``ops.linear`` keeps oneDNN's packed copy of a weight that requires no gradient
(``linear_op._PACKED``): same numbers as ``F.linear``, one packing per change of the weight,
never for a weight an optimizer may update or one made for a single call."""

from __future__ import annotations

import gc
import importlib

import pytest
import torch
from linear_kit import rand, reference, rel_diff
from torch import nn

linear_module = importlib.import_module("clusterformer.ops.fused_linear")
op_module = importlib.import_module("clusterformer.ops.linear_op")  # where the cache lives
linear = linear_module.linear

pytestmark = pytest.mark.skipif(not linear_module._ONEDNN or op_module._REORDER is None,
                                reason="torch built without oneDNN's weight reorder")
RTOL = 1e-5


def frozen(out_dim: int, in_dim: int, seed: int = 0) -> nn.Parameter:
    return nn.Parameter(rand(seed, out_dim, in_dim) / in_dim**0.5, requires_grad=False)


@pytest.fixture(autouse=True)
def empty_cache(monkeypatch):
    monkeypatch.setattr(op_module, "_PACKED", type(op_module._PACKED)())


def packed_entry(weight: torch.Tensor):
    entry = op_module._PACKED.get(weight)
    return None if entry is None else entry[1]


@pytest.mark.parametrize("lead", [(7,), (2, 5, 3)])
@pytest.mark.parametrize("activation", ["none", "gelu"])
@pytest.mark.parametrize("transposed_input", [False, True])
def test_a_frozen_weight_is_packed_once_and_gives_f_linears_numbers(lead, activation, transposed_input):
    weight, bias = frozen(48, 24), rand(1, 48)
    x = rand(2, 24, *lead).movedim(0, -1) if transposed_input else rand(2, *lead, 24)
    with torch.no_grad():
        first = linear(x, weight, bias, activation=activation)
        packed = packed_entry(weight)
        second = linear(x, weight, bias, activation=activation)
    assert packed is not None and packed.layout == torch._mkldnn
    assert packed_entry(weight) is packed  # reused, not packed again
    want = reference(x, weight, bias, activation)
    assert rel_diff(first, want) < RTOL and torch.equal(first, second)


@pytest.mark.parametrize("write", ["one unsampled value, in place", "all but column 0, via .data",
                                   "a new storage"])
def test_a_changed_weight_is_repacked_and_the_output_follows(write):
    weight, x = frozen(64, 48), rand(3, 4, 48)  # 3072 values, 32 of them sampled
    with torch.no_grad():
        linear(x, weight)
        before = packed_entry(weight)
        if write == "one unsampled value, in place":  # moves only the version counter
            weight[0, 1] += 1.0
        elif write == "all but column 0, via .data":  # moves no counter: the samples see it
            weight.data[:, 1:].mul_(2.0)
        else:  # same version, same values, other memory
            weight.data = weight.data.clone()
        got = linear(x, weight)
    assert packed_entry(weight) is not before
    assert rel_diff(got, reference(x, weight, None, "none")) < RTOL


def test_load_state_dict_reaches_a_frozen_model():
    model = nn.Linear(8, 16).requires_grad_(False)
    other = nn.Linear(8, 16)
    x = rand(4, 5, 8)

    def run() -> torch.Tensor:
        with torch.no_grad():
            return linear(x, model.weight, model.bias)

    run()
    model.load_state_dict(other.state_dict())
    assert rel_diff(run(), reference(x, other.weight.detach(), other.bias.detach(), "none")) < RTOL


@pytest.mark.parametrize("autocast", [False, True])
def test_weights_that_may_change_unseen_or_live_one_call_are_not_packed(autocast):
    x = rand(5, 4, 8)
    trainable = nn.Parameter(rand(6, 16, 8))  # an optimizer may write it without a version bump
    transient = rand(7, 16, 8)  # not a parameter: a weight made for this call
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        linear(x, trainable)
        linear(x, transient)
    assert len(op_module._PACKED) == 0


def test_a_weight_that_requires_grad_again_drops_its_copy():
    weight, x = frozen(16, 8), rand(14, 3, 8)
    with torch.no_grad():
        linear(x, weight)
        assert len(op_module._PACKED) == 1
        weight.requires_grad_(True)
        linear(x, weight)
    assert len(op_module._PACKED) == 0


def test_a_weight_that_leaves_the_onednn_path_drops_its_copy():
    weight = frozen(16, 8)
    with torch.no_grad():
        linear(rand(15, 3, 8), weight)
        assert len(op_module._PACKED) == 1
        weight.data = weight.data.double()  # as model.double() does: F.linear serves it now
        got = linear(rand(15, 3, 8).double(), weight)
    assert got.dtype == torch.float64 and len(op_module._PACKED) == 0


def test_bf16_autocast_packs_the_cast_copy_and_follows_a_change():
    weight, x = frozen(32, 16), rand(8, 6, 16)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        first = linear(x, weight)
        cast = linear_module._CASTS.get(weight)[1]
        assert cast.dtype == torch.bfloat16 and packed_entry(cast) is not None
        weight.data.copy_(rand(9, 32, 16))  # no version bump, as a fused optimizer's step
        second = linear(x, weight)
    assert first.dtype == second.dtype == torch.bfloat16
    assert rel_diff(second, reference(x, weight, None, "none")) < 2e-2


def test_a_packed_copy_dies_with_its_weight():
    weight = frozen(16, 8)
    with torch.no_grad():
        linear(rand(10, 2, 8), weight)
    assert len(op_module._PACKED) == 1
    del weight
    gc.collect()
    assert len(op_module._PACKED) == 0


@pytest.mark.parametrize("refreeze", [False, True])
def test_inference_after_fused_training_sees_the_trained_weights(refreeze):
    # Fused AdamW moves no version counter: the sampled values catch its update when the model
    # is frozen again (unfrozen, its parameters are not packed at all).
    model = nn.Linear(48, 64).requires_grad_(False)  # 3072 weights, 32 of them sampled
    x = rand(12, 6, 48)
    with torch.no_grad():
        linear(x, model.weight, model.bias)
    model.requires_grad_(True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, fused=True)
    linear(x, model.weight, model.bias).square().sum().backward()
    optimizer.step()  # (torch 2.13-2.14: leaves the version counter as it was)
    model.requires_grad_(not refreeze)
    with torch.no_grad():
        got = linear(x, model.weight, model.bias)
    assert rel_diff(got, reference(x, model.weight.detach(), model.bias.detach(), "none")) < RTOL


def test_a_frozen_model_compiled_with_freezing_keeps_its_packed_weights():
    # The compiled graph hands the custom op the parameter itself: the op packs as eager does.
    model = nn.Linear(16, 32).requires_grad_(False)
    x = rand(13, 4, 16)
    compiled = torch.compile(lambda t: linear(t, model.weight, model.bias, activation="gelu"),
                             fullgraph=True, options={"freezing": True})
    with torch.no_grad():
        got = compiled(x)
    assert packed_entry(model.weight) is not None
    assert rel_diff(got, reference(x, model.weight, model.bias, "gelu")) < RTOL
