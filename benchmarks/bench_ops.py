"""Recurrent cross-attention clustering: eager vs torch.compile vs a naive reference.

Shapes follow the backbone: many small windows (windows x batch = 64, N = 49 tokens) and one
global window (N = 56 * 56 = 3136), K from 4 to 100 centers, 3 heads of 32 channels, T = 3.

    python benchmarks/bench_ops.py [--threads 2] [--repeats 20] [--markdown]
"""

from __future__ import annotations

import argparse
import platform
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from clusterformer.ops import recurrent_cross_attention_clustering

HEADS, HEAD_DIM, ITERS = 3, 32, 3
DIM = HEADS * HEAD_DIM
CASES = [(64, 49, k) for k in (4, 9, 16)] + [(1, 3136, k) for k in (4, 25, 49, 100)]


def naive_reference(features, centers, params, *, num_iters, num_heads):
    """Algorithm 1 as written: a Python loop over batch items and heads, one head at a time."""
    dim = features.shape[-1] // num_heads
    out = []
    for f, c in zip(features, centers, strict=True):
        keys = F.linear(f, params["k_weight"], params["k_bias"])
        values = F.linear(f, params["v_weight"], params["v_bias"])
        for _ in range(num_iters):
            queries = F.linear(c, params["q_weight"], params["q_bias"])
            updates = []
            for h in range(num_heads):
                sl = slice(h * dim, (h + 1) * dim)
                logits = queries[:, sl] @ keys[:, sl].T / dim**0.5
                updates.append(torch.softmax(logits, dim=0) @ values[:, sl])
            c = c + torch.cat(updates, dim=-1)
        out.append(c)
    return torch.stack(out)


def timed(fn: Callable[[], torch.Tensor], repeats: int) -> float:
    """Median seconds per call after warm-up."""
    for _ in range(3):
        fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    samples.sort()
    return samples[len(samples) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--backward", action="store_true", help="time forward + backward")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    params = {f"{n}_{p}": (torch.randn(DIM, DIM) / DIM**0.5 if p == "weight" else torch.zeros(DIM))
              for n in "qkv" for p in ("weight", "bias")}

    def op(features, centers):
        return recurrent_cross_attention_clustering(
            features, centers, params, num_iters=ITERS, num_heads=HEADS)

    compiled = torch.compile(op, fullgraph=True, dynamic=False)
    mode = "fwd+bwd" if args.backward else "fwd"
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{args.threads} threads, {mode}, T={ITERS}, {HEADS}x{HEAD_DIM}")
    print("| B*windows | N | K | naive ms | eager ms | compiled ms | eager vs naive | compiled vs eager |")
    print("|---|---|---|---|---|---|---|---|")
    for batch, n, k in CASES:
        features = torch.randn(batch, n, DIM, requires_grad=args.backward)
        centers = torch.randn(batch, k, DIM, requires_grad=args.backward)

        def run(fn, features=features, centers=centers):
            def call():
                out = fn(features, centers)
                if args.backward:
                    out.sum().backward()
                return out
            return call

        naive = timed(run(lambda f, c: naive_reference(f, c, params, num_iters=ITERS,
                                                        num_heads=HEADS)), max(3, args.repeats // 4))
        eager = timed(run(op), args.repeats)
        comp = timed(run(compiled), args.repeats)
        print(f"| {batch} | {n} | {k} | {naive * 1e3:.2f} | {eager * 1e3:.2f} | {comp * 1e3:.2f} "
              f"| {naive / eager:.2f}x | {eager / comp:.2f}x |")


if __name__ == "__main__":
    main()
