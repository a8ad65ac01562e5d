"""Forward throughput of the ClusterFormer presets, eager and ``torch.compile``.

    OMP_NUM_THREADS=2 python benchmarks/bench_backbone.py --models clusterformer-nano \
        clusterformer-tiny --batch-size 8 --image-size 224 --threads 2

Prints one line per (model, mode) and a Markdown table; ``--json FILE`` also writes the rows.
Times the median of ``--iters`` batches after ``--warmup`` batches (compilation happens in the
warm-up and is reported separately). Inference only (``torch.no_grad``, eval mode).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch
from report import print_report

from clusterformer.models import create_model


def bench(model: torch.nn.Module, images: torch.Tensor, warmup: int, iters: int) -> tuple[float, float]:
    """Returns (seconds spent in warm-up, median seconds per batch)."""
    with torch.no_grad():
        start = time.perf_counter()
        for _ in range(warmup):
            model(images)
        warm = time.perf_counter() - start
        times = []
        for _ in range(iters):
            start = time.perf_counter()
            model(images)
            times.append(time.perf_counter() - start)
    return warm, statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["clusterformer-nano", "clusterformer-tiny"])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--modes", nargs="+", default=["eager", "compile"],
                        choices=["eager", "compile"])
    parser.add_argument("--json", dest="json_out", default=None, help="also write rows here")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    images = torch.randn(args.batch_size, 3, args.image_size, args.image_size)
    rows = []
    for name in args.models:
        model = create_model(name).eval()
        for mode in args.modes:
            runner = torch.compile(model, fullgraph=True) if mode == "compile" else model
            warm, per_batch = bench(runner, images, args.warmup, args.iters)
            row = {
                "model": name, "mode": mode, "batch": args.batch_size,
                "image_size": args.image_size, "threads": args.threads,
                "img_per_s": round(args.batch_size / per_batch, 2),
                "ms_per_batch": round(per_batch * 1e3, 1), "warmup_s": round(warm, 1),
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(f"\ntorch {torch.__version__}, python {platform.python_version()}, "
          f"{args.threads} threads, batch {args.batch_size}, {args.image_size}x{args.image_size}\n")
    print_report(rows, {"model": "model", "mode": "mode", "img/s": "img_per_s",
                        "ms/batch": "ms_per_batch", "warm-up s (incl. compile)": "warmup_s"},
                 args.json_out)  # fmt: skip


if __name__ == "__main__":
    main()
