"""The ops under torch's function transforms: compile, vmap, grad, gradcheck."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.func import functional_call, grad, vmap

from clusterformer.ops import (
    cross_attention_clustering_step,
    feature_dispatching,
    init_centers,
    recurrent_cross_attention_clustering,
)


def rand(seed: int, *shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def make_params(dim: int, dtype=torch.float32) -> dict[str, torch.Tensor]:
    out = {}
    for i, name in enumerate("qkv"):
        out[f"{name}_weight"] = rand(i, dim, dim, dtype=dtype) / dim**0.5
        out[f"{name}_bias"] = rand(10 + i, dim, dtype=dtype) * 0.1
    return out


class Mixer(torch.nn.Module):
    """A minimal parameter holder that calls the ops, as models/ does."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        # No query bias, as models/ has none for an assignment over centers (it would cancel).
        self.q = torch.nn.Linear(dim, dim, bias=False)
        self.k, self.v = torch.nn.Linear(dim, dim), torch.nn.Linear(dim, dim)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(dim, dim), torch.nn.GELU())
        self.alpha = torch.nn.Parameter(torch.tensor(1.0))
        self.beta = torch.nn.Parameter(torch.tensor(0.0))
        self.heads = heads

    def forward(self, feature_map: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        features = feature_map.flatten(-2).transpose(-1, -2)  # (B, N, D)
        centers = init_centers(feature_map, (2, 2), mask=mask)
        params = {f"{n}_{p}": getattr(getattr(self, n), p) for n in "qkv" for p in ("weight", "bias")
                  if getattr(getattr(self, n), p) is not None}
        centers = recurrent_cross_attention_clustering(
            features, centers, params, num_iters=3, num_heads=self.heads, mask=mask.flatten(-2)
        )
        return feature_dispatching(features, centers, alpha=self.alpha, beta=self.beta, mlp=self.mlp)


COMPILE_CASES = [
    pytest.param((2, 5), 4, 12, 8, 2, id="batch-window-heads"),
    pytest.param((), 9, 49, 16, 1, id="unbatched"),
]


@pytest.mark.parametrize(("lead", "k", "n", "dim", "heads"), COMPILE_CASES)
def test_compile_fullgraph_matches_eager(lead, k, n, dim, heads):
    torch._dynamo.reset()
    features, centers = rand(100, *lead, n, dim), rand(101, *lead, k, dim)
    mask = torch.ones(*lead, n, dtype=torch.bool)
    mask[..., n // 2 :] = torch.arange(n - n // 2) % 2 == 0
    alpha, beta = torch.tensor(1.5), torch.tensor(-0.2)
    mlp = torch.nn.Linear(dim, dim)
    params = make_params(dim)

    def pipeline(features, centers, mask):
        centers = recurrent_cross_attention_clustering(
            features, centers, params, num_iters=3, num_heads=heads, mask=mask
        )
        return feature_dispatching(features, centers, alpha=alpha, beta=beta, mlp=mlp)

    compiled = torch.compile(pipeline, fullgraph=True, backend="inductor")
    torch.testing.assert_close(compiled(features, centers, mask), pipeline(features, centers, mask),
                               rtol=1e-4, atol=1e-5)


def test_compiled_module_backward_matches_eager():
    torch._dynamo.reset()
    module = Mixer(8, 2)
    feature_map = rand(0, 2, 8, 4, 6)
    mask = torch.ones(2, 4, 6, dtype=torch.bool)
    mask[1, :, 4:] = False  # the second image is padded on the right
    compiled = torch.compile(module, fullgraph=True)
    eager_grads = torch.autograd.grad(module(feature_map, mask).square().sum(), module.parameters())
    compiled_grads = torch.autograd.grad(
        compiled(feature_map, mask).square().sum(), module.parameters())
    for eager, comp in zip(eager_grads, compiled_grads, strict=True):
        torch.testing.assert_close(comp, eager, rtol=1e-4, atol=1e-5)


@settings(max_examples=20, deadline=None)
@given(batch=st.integers(1, 4), k=st.integers(1, 5), n=st.integers(1, 9),
       heads=st.integers(1, 2), seed=st.integers(0, 2**16))
def test_vmap_matches_batched(batch, k, n, heads, seed):
    dim = 2 * heads
    features, centers = rand(seed, batch, n, dim), rand(seed + 1, batch, k, dim)
    mask = rand(seed + 2, batch, n) > -0.5
    params = make_params(dim)

    def one(features, centers, mask):
        return recurrent_cross_attention_clustering(
            features, centers, params, num_iters=2, num_heads=heads, mask=mask)

    torch.testing.assert_close(vmap(one)(features, centers, mask), one(features, centers, mask))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # inference under autocast, vmapped
        torch.testing.assert_close(vmap(one)(features, centers, mask),
                                   one(features, centers, mask), atol=2e-2, rtol=2e-2)

    alpha, beta = torch.tensor(2.0), torch.tensor(0.1)
    mlp = torch.nn.Linear(dim, dim)

    def dispatch(features, centers):
        return feature_dispatching(features, centers, alpha=alpha, beta=beta, mlp=mlp)

    torch.testing.assert_close(vmap(dispatch)(features, centers), dispatch(features, centers))
    fmap = rand(seed + 3, batch, dim, 3, 4)
    torch.testing.assert_close(vmap(lambda f: init_centers(f, (2, 2)))(fmap),
                               init_centers(fmap, (2, 2)))


def test_func_grad_and_functional_call():
    module = Mixer(4, 2)
    feature_map = rand(0, 1, 4, 3, 3)
    mask = torch.ones(1, 3, 3, dtype=torch.bool)
    params = dict(module.named_parameters())

    def loss(params):
        return functional_call(module, params, (feature_map, mask)).square().sum()

    grads = grad(loss)(params)
    expected = torch.autograd.grad(loss(params), list(params.values()))
    for name, value in zip(params, expected, strict=True):
        torch.testing.assert_close(grads[name], value)
        assert torch.isfinite(grads[name]).all()


def test_gradcheck_float64():
    dtype = torch.float64
    q, k, v = (rand(i, 2, n, 3, dtype=dtype).requires_grad_() for i, n in enumerate((3, 5, 5)))
    mask = torch.tensor([[True, True, False, True, True], [True] * 5])
    assert torch.autograd.gradcheck(
        lambda q, k, v: cross_attention_clustering_step(q, k, v, mask=mask), (q, k, v))

    features = rand(5, 6, 4, dtype=dtype).requires_grad_()
    centers = rand(6, 3, 4, dtype=dtype).requires_grad_()
    weights = [p.requires_grad_() for p in make_params(4, dtype).values()]
    names = list(make_params(4))

    def recurrent(features, centers, *weights):
        return recurrent_cross_attention_clustering(
            features, centers, dict(zip(names, weights, strict=True)), num_iters=3, num_heads=2)

    assert torch.autograd.gradcheck(recurrent, (features, centers, *weights))

    alpha = torch.tensor(1.3, dtype=dtype, requires_grad=True)
    beta = torch.tensor(-0.4, dtype=dtype, requires_grad=True)
    w = rand(7, 4, 4, dtype=dtype).requires_grad_()

    def dispatch(features, centers, alpha, beta, w):
        return feature_dispatching(features, centers, alpha=alpha, beta=beta,
                                   mlp=lambda x: F.linear(torch.tanh(x), w))

    assert torch.autograd.gradcheck(dispatch, (features, centers, alpha, beta, w))
