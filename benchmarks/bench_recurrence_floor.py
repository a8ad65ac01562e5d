"""What T = 3 must cost over T = 1 on this CPU: the extra iterations' products, timed alone.

    OMP_NUM_THREADS=1 python benchmarks/bench_recurrence_floor.py --rounds 16

Recurrent clustering (Algorithm 1) with T = 3 does two more iterations than T = 1 in every block
of clusterformer-tiny. Each iteration projects the centers to queries with a ``D x D`` linear
and runs two batched products per window and head (9 centers by 49 pixels, 32 channels); a
training step adds their backward: two more products for the linear and four for the batched
ones. This script times, in one process and interleaved rounds:

* ``step T=1``: tiny's whole training step with T = 1 (what ``cf benchmark`` times: batch 8 at
  224 px, cross-entropy, backward, fused AdamW);
* ``extra products``: only those products of two iterations at tiny's shapes in every block
  (batch 8 at 224 px, the 7x7 windows of every stage), on random data, nothing else: no
  softmax, no residual add, no copies, no autograd.

``extra products / step T=1`` is then the overhead that T = 3 cannot go below with these
kernels, however the glue around them is written (the products run as the step runs them:
the linear and its gradients by ``ops.linear``'s kernels, ``torch.bmm`` for the rest). Minimum over rounds for both (the
least disturbed call) and the median of the per-round ratios are printed; their FLOPs as a
share of the step's come from ``torch.utils.flop_counter`` on the two models.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from clusterformer.bench.models import count_gflops, parse_model
from clusterformer.bench.runner import BenchConfig, Runner
from clusterformer.models.backbones import PRESETS
from clusterformer.ops import linear
from clusterformer.ops.fused_linear import _linear_grads
from clusterformer.runtime import configure

MODEL = "clusterformer-tiny"
CENTERS, PIXELS = 9, 49  # the 3x3 center grid of a 7x7-token window


def block_shapes(batch: int, image: int) -> list[tuple[int, int, int]]:
    """``(windows, channels, heads)`` of every block of tiny at ``batch x image x image``."""
    preset = PRESETS[MODEL]
    shapes = []
    side = image // 4  # tokens per side after the stride-4 stem
    for stage, (depth, dim) in enumerate(zip(preset["depths"], preset["dims"], strict=True)):
        if stage:
            side = (side + 1) // 2  # a 3x3 stride-2 convolution with padding 1
        windows = batch * ((side + 6) // 7) ** 2  # padded to whole 7x7 windows
        shapes += [(windows, dim, dim // preset["head_dim"])] * depth
    return shapes


def extra_products(shapes: list[tuple[int, int, int]], iterations: int) -> dict[str, tuple]:
    """The products ``iterations`` recurrent iterations add, as ``{part: (callable, FLOPs)}``:
    the query projections (forward, input and weight gradients) and the batched products."""
    gen = torch.Generator().manual_seed(0)

    def rand(*size: int) -> torch.Tensor:
        return torch.randn(*size, generator=gen)

    projections, batched, projection_flops, batched_flops = [], [], 0, 0
    for windows, dim, heads in shapes:
        rows, batch, head_dim = windows * CENTERS, windows * heads, dim // heads
        projections.append((rand(rows, dim), rand(dim, dim) * dim**-0.5, rand(rows, dim)))
        batched.append((rand(batch, CENTERS, head_dim), rand(batch, PIXELS, head_dim),
                        rand(batch, PIXELS, head_dim), rand(batch, CENTERS, PIXELS),
                        rand(batch, CENTERS, PIXELS), rand(batch, CENTERS, head_dim)))
        projection_flops += iterations * 3 * 2 * rows * dim * dim
        batched_flops += iterations * 6 * 2 * batch * CENTERS * PIXELS * head_dim

    @torch.no_grad()
    def run_projections() -> None:
        for centers, weight, grad_q in projections:
            for _ in range(iterations):
                linear(centers, weight)  # the queries, by the step's own oneDNN path
                # their input and weight gradients, by the kernels the step's backward picks
                _linear_grads(grad_q, centers, weight, (True, True, False), True)

    @torch.no_grad()
    def run_batched() -> None:
        for q, k, v, assign, grad_logits, grad_update in batched:
            for _ in range(iterations):
                torch.bmm(q, k.transpose(1, 2))                 # logits
                torch.bmm(assign, v)                            # center update
                torch.bmm(grad_update, v.transpose(1, 2))       # gradient of the assignment
                torch.bmm(assign.transpose(1, 2), grad_update)  # gradient of v
                torch.bmm(grad_logits, k)                       # gradient of q
                torch.bmm(q.transpose(1, 2), grad_logits)       # gradient of k (as k^T)

    return {"query projections": (run_projections, projection_flops),
            "batched products": (run_batched, batched_flops)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--out", default="recurrence_floor.json")
    args = parser.parse_args()
    print(configure(threads=args.threads), flush=True)
    cfg = BenchConfig(batch_size=args.batch_size, image_size=224, rounds=args.rounds, warmup=2,
                      amp="none", device="cpu")
    torch.manual_seed(0)
    images = torch.randn(args.batch_size, 3, 224, 224)
    labels = torch.randint(0, 1000, (args.batch_size,))
    one = f"{MODEL}:num_iters=1"
    step = Runner(parse_model(one), "train", False, cfg, torch.device("cpu"), images, labels)
    parts = extra_products(block_shapes(args.batch_size, 224), iterations=2)
    calls = {"step T=1": step.call, **{name: fn for name, (fn, _) in parts.items()}}

    def timed(fn) -> float:
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start

    for fn in calls.values():
        for _ in range(cfg.warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in calls}
    for index in range(args.rounds):
        names = list(calls)
        for name in names[index % len(names):] + names[:index % len(names)]:  # rotating order
            times[name].append(timed(calls[name]))
    step_s = times.pop("step T=1")
    products_s = [sum(values) for values in zip(*times.values(), strict=True)]
    product_flops = sum(flops for _, flops in parts.values())
    step_gflop = count_gflops(parse_model(one), 224) * args.batch_size * 3
    flop_share = product_flops / 1e9 / step_gflop
    ratios = [p / s for p, s in zip(products_s, step_s, strict=True)]
    result = {
        "torch": torch.__version__, "threads": args.threads, "batch_size": args.batch_size,
        "rounds": args.rounds, "step_t1_s": step_s, "extra_products_s": products_s,
        "parts_s": times, "parts_gflop": {name: flops / 1e9 for name, (_, flops) in parts.items()},
        "extra_product_gflop": round(product_flops / 1e9, 2), "step_t1_gflop": round(step_gflop, 1),
        "floor_min": min(products_s) / min(step_s), "floor_median": statistics.median(ratios),
        "flop_share": flop_share,
    }
    print(f"step T=1: min {min(step_s):.3f} s, median {statistics.median(step_s):.3f} s "
          f"({step_gflop:.1f} GFLOP, three forwards' products; "
          f"{step_gflop / min(step_s):.1f} GFLOP/s over the whole step)")
    for name, (_, flops) in parts.items():
        print(f"{name} of two iterations: min {min(times[name]) * 1e3:.1f} ms "
              f"({flops / 1e9:.2f} GFLOP, {flops / 1e9 / min(times[name]):.1f} GFLOP/s)")
    print(f"T = 3 overhead floor: {result['floor_min']:+.2%} (minima), "
          f"{result['floor_median']:+.2%} (median per-round ratio); FLOP share {flop_share:+.2%}; "
          f"target <= +3.81%")
    with open(args.out, "w") as handle:
        json.dump(result, handle, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
