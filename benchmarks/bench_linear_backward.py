"""oneDNN against BLAS for the two gradient products of ``ops.linear``, at tiny's shapes.

The thresholds in ``clusterformer/ops/fused_linear.py`` come from this: the input gradient
``grad @ W`` (oneDNN handed ``W^T`` as a view, against BLAS ``mm``) and the weight gradient
``grad^T @ x`` (oneDNN in the orientation ``_onednn_weight_grad`` picks, against BLAS). Each
pair is timed alternately in one process; the ratio is the median of the per-pair time ratios
(below 1: oneDNN is faster). Rows are tiny's at batch 8 (stage 1: 25088 tokens, 4608 centers;
stage 4: 392 tokens, 72 centers).

    OMP_NUM_THREADS=1 python benchmarks/bench_linear_backward.py [--pairs 15]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from clusterformer.engine.runtime import tune_cpu_allocator
from clusterformer.ops import fused_linear

# (rows, in, out): MLPs, K/V and query projections of tiny's four stages at batch 8.
SHAPES = [
    (25088, 96, 768), (25088, 768, 96), (25088, 96, 192), (4608, 96, 96),
    (6272, 192, 1536), (6272, 1536, 192), (1152, 192, 192),
    (1568, 384, 1536), (1568, 1536, 384), (288, 384, 384),
    (392, 768, 3072), (392, 3072, 768), (72, 768, 768),
]


def time_ratio(first: Callable[[], object], second: Callable[[], object], pairs: int) -> float:
    """Median over alternating pairs of ``time(first) / time(second)``."""
    for _ in range(2):
        first(), second()
    ratios = []
    for _ in range(pairs):
        start = time.perf_counter()
        first()
        middle = time.perf_counter()
        second()
        ratios.append((middle - start) / (time.perf_counter() - middle))
    return statistics.median(ratios)


def gradient_ratios(rows: int, in_dim: int, out_dim: int, pairs: int) -> tuple[float, float]:
    """oneDNN / BLAS time of the input gradient and of the weight gradient at one shape."""
    grad, x = torch.randn(rows, out_dim), torch.randn(rows, in_dim)
    weight = torch.randn(out_dim, in_dim)
    input_grad = time_ratio(lambda: fused_linear._onednn_linear(grad, weight.t(), None),
                            lambda: grad @ weight, pairs)
    weight_grad = time_ratio(lambda: fused_linear._onednn_weight_grad(grad, x),
                             lambda: grad.t() @ x, pairs)
    return input_grad, weight_grad


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=15)
    args = parser.parse_args()
    tune_cpu_allocator()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); "
          f"oneDNN time / BLAS time (weight gradient: oneDNN used up to "
          f"{fused_linear._ONEDNN_MAX_ROWS_FOR_WEIGHT_GRAD} rows)")
    print(f"{'rows':>6} {'in':>5} {'out':>5} {'input grad':>11} {'weight grad':>12}")
    for rows, in_dim, out_dim in SHAPES:
        input_grad, weight_grad = gradient_ratios(rows, in_dim, out_dim, args.pairs)
        print(f"{rows:6d} {in_dim:5d} {out_dim:5d} {input_grad:11.2f} {weight_grad:12.2f}")


if __name__ == "__main__":
    main()
