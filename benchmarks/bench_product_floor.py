"""How much of a step is matrix products: clusterformer-tiny against timm's Swin-T, one process.

The speed targets of clusterformer-tiny (at least Swin-T's img/s, eager fp32 on a CPU) ask a
model with 1.23x Swin-T's matmul/conv FLOPs to finish first. This script measures whether that
is possible without changing the model's math: in one process, over interleaved rounds, it
times each model's whole call (a batch's forward, or a whole AdamW training step, as
``cf benchmark`` does) and, in a second call of the same round under ``torch.profiler``, the
time its kernels for products take (the self time of matmul, linear, convolution and fused
attention ops, forward and backward). If tiny's products alone take about as long as Swin-T's
whole call, no removal of glue can make tiny the faster one.

    OMP_NUM_THREADS=1 python benchmarks/bench_product_floor.py --rounds 6 --threads 1

Needs timm (``pip install 'clusterformer[bench]'`` next to a matching torch/torchvision pair).
Medians over rounds; the profiled call is not the timed one (the profiler slows small ops).
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch

from clusterformer.bench.models import count_gflops, parse_model
from clusterformer.bench.runner import BenchConfig, Runner, rotations
from clusterformer.engine.runtime import tune_cpu_allocator

MODELS = ("clusterformer-tiny", "timm/swin_tiny_patch4_window7_224")
# Kernels that do the multiply-adds (their self time, so a wrapper op is not counted twice).
PRODUCT_OPS = frozenset({
    "mkldnn::_linear_pointwise", "aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm",
    "aten::mkldnn_convolution", "aten::convolution_backward", "aten::_convolution",
    "aten::thnn_conv2d", "aten::_slow_conv2d_forward", "aten::_slow_conv2d_backward",
    "aten::_scaled_dot_product_flash_attention_for_cpu",
    "aten::_scaled_dot_product_flash_attention_for_cpu_backward",
})


def product_seconds(runner: Runner) -> float:
    """Self CPU seconds of the product kernels in one call of ``runner``."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        runner.call()
    return sum(e.self_cpu_time_total for e in prof.key_averages() if e.key in PRODUCT_OPS) / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--out", default="product_floor.json")
    args = parser.parse_args()
    tune_cpu_allocator()  # as every cf command does
    torch.set_num_threads(args.threads)
    cfg = BenchConfig(batch_size=args.batch_size, image_size=224, rounds=args.rounds,
                      warmup=2, amp="none", device="cpu")
    torch.manual_seed(0)
    images = torch.randn(args.batch_size, 3, 224, 224)
    labels = torch.randint(0, 1000, (args.batch_size,))
    runners = {}
    for name in MODELS:
        spec = parse_model(name)
        for mode in ("infer", "train"):
            runners[(name, mode)] = Runner(spec, mode, False, cfg, torch.device("cpu"),
                                            images, labels)
    for runner in runners.values():
        for _ in range(cfg.warmup):
            runner.call()
    wall = {key: [] for key in runners}
    products = {key: [] for key in runners}
    # rotations never ends: zip stops it after --rounds.
    for round_index, keys in zip(range(args.rounds), rotations(list(runners)), strict=False):
        for key in keys:
            wall[key].append(runners[key].timed_call())
            products[key].append(product_seconds(runners[key]))
        print(f"round {round_index + 1}/{args.rounds} done", flush=True)
    gflops = {name: count_gflops(parse_model(name), 224) for name in MODELS}
    rows = []
    for (name, mode), runner in runners.items():
        # A training step does the forward's products three times (forward, input and
        # weight gradients; the first layer's input gradient is skipped, a rounding error).
        step_gflop = gflops[name] * args.batch_size * (3 if mode == "train" else 1)
        wall_s, prod_s = statistics.median(wall[(name, mode)]), statistics.median(products[(name, mode)])
        rows.append({
            "model": name, "mode": mode, "threads": args.threads, "batch_size": args.batch_size,
            "gflop_per_call": round(step_gflop, 1), "wall_s": round(wall_s, 3),
            "product_s": round(prod_s, 3), "product_share": round(prod_s / wall_s, 3),
            "product_gflops_per_s": round(step_gflop / prod_s, 1),
            "params_m": round(runner.params_m, 2),
        })
    tiny, swin = MODELS
    print(f"{'mode':5} {'model':34} {'GFLOP':>7} {'wall s':>7} {'products s':>10} "
          f"{'share':>6} {'GFLOP/s':>8}")
    for row in rows:
        print(f"{row['mode']:5} {row['model']:34} {row['gflop_per_call']:7.1f} {row['wall_s']:7.3f} "
              f"{row['product_s']:10.3f} {row['product_share']:6.2f} {row['product_gflops_per_s']:8.1f}")
    for mode in ("infer", "train"):
        t = next(r for r in rows if r["model"] == tiny and r["mode"] == mode)
        s = next(r for r in rows if r["model"] == swin and r["mode"] == mode)
        print(f"{mode}: tiny's products alone / Swin-T's whole call = "
              f"{t['product_s'] / s['wall_s']:.2f}; tiny x Swin-T speed = {s['wall_s'] / t['wall_s']:.2f}")
    with open(args.out, "w") as handle:
        json.dump({"torch": torch.__version__, "rows": rows,
                   "wall_s": {f"{k[0]}|{k[1]}": v for k, v in wall.items()},
                   "product_s": {f"{k[0]}|{k[1]}": v for k, v in products.items()}}, handle, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
