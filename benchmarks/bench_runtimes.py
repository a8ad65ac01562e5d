"""Inference of presets and timm peers in PyTorch eager and in ONNX Runtime, per image and per FLOP.

    OMP_NUM_THREADS=1 PYTHONPATH=. /work/venv-timm/bin/python benchmarks/bench_runtimes.py \
        --models clusterformer-tiny timm/swin_tiny_patch4_window7_224 --rounds 10

What ``cf benchmark --runtime onnxruntime --mode infer --no-memory`` measures (the same
``clusterformer.bench.measure``, the same ONNX exports and sessions, the same interleaved
rounds), runnable from any Python environment that has this tree on ``PYTHONPATH``, timm and the
export extra, e.g. a venv made for timm whose installed ``cf`` is another checkout's. Adds what
the issue's tables ask for: each row against the last model (the peer) per image and per FLOP,
as medians of per-round ratios.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

from clusterformer.bench import BenchConfig, machine_info, measure, parse_model
from clusterformer.bench.onnx_runtime import OnnxExports


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+",
                        default=["clusterformer-tiny", "timm/swin_tiny_patch4_window7_224"])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, nargs="+", default=[1])
    args = parser.parse_args()

    specs = [parse_model(m) for m in args.models]
    cfg = BenchConfig(batch_size=args.batch_size, image_size=args.image_size,
                      rounds=args.rounds, warmup=args.warmup, modes=("infer",),
                      threads=tuple(args.threads), memory=False)
    peer = specs[-1].label
    with OnnxExports(cfg) as onnx:
        rows = measure(specs, cfg, baseline=peer, onnx=onnx,
                       progress=lambda text: print(text, file=sys.stderr, flush=True))
    machine = machine_info("cpu")
    print(f"{machine['cpu']}, torch {machine['torch']}, timm {machine.get('timm')}, "
          f"{machine['date']}, batch {args.batch_size}, {args.image_size} px, "
          f"{args.rounds} interleaved rounds, load average {os.getloadavg()[0]:.2f} at the end")
    print(f"| threads | model | runtime | img/s | x {peer} eager | x {peer} same runtime, "
          "per image | per FLOP | ONNX max rel. diff |")
    print("|---:|---|---|---:|---:|---:|---:|---:|")
    for row in rows:
        same = next(r for r in rows if r["model"] == peer and r["runtime"] == row["runtime"]
                    and r["threads"] == row["threads"])
        ratio = statistics.median(p / t for t, p in zip(row["round_ms"], same["round_ms"],
                                                         strict=True))
        diff = row.get("onnx_max_rel_diff")
        print(f"| {row['threads']} | {row['model']} | {row['runtime']} | {row['img_per_s']:.2f} "
              f"| {row['speed_vs_baseline']:.3f} | {ratio:.3f} | "
              f"{ratio * row['gflops'] / same['gflops']:.3f} | "
              f"{'-' if diff is None else f'{diff:.1e}'} |")


if __name__ == "__main__":
    sys.exit(main())
