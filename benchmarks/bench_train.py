"""Training-step throughput and peak memory of a classification preset, through the engine.

    python benchmarks/bench_train.py --model clusterformer-tiny --image-size 224 \
        --batch-size 128 --device cuda --amps bf16 none --modes eager compile --json rows.json

Each (amp, mode) pair builds a fresh model, AdamW and warm-up/cosine schedule and runs the
engine's own :func:`clusterformer.engine.step.train_step` (the step ``cf train`` runs: autocast,
backward, clipping, optimizer) on one random batch that stays on the device, so the numbers
exclude data loading. Times the median of ``--steps`` steps after ``--warmup`` steps
(compilation happens in the warm-up and is reported separately); on CUDA the peak is
``torch.cuda.max_memory_allocated`` over the timed steps.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch
from report import print_report

from clusterformer.engine.optim import Schedule, build_optimizer
from clusterformer.engine.step import TrainState, make_scaler, train_step
from clusterformer.tasks import build_task


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_one(args: argparse.Namespace, amp: str, mode: str, device: torch.device) -> dict:
    torch.manual_seed(0)
    task = build_task("classification", args.num_classes, label_smoothing=0.1)
    module = task.build_model(args.model).to(device)
    total = args.warmup + args.steps
    state = TrainState(
        model=torch.compile(module) if mode == "compile" else module, module=module,
        optimizer=build_optimizer(module, lr=1e-4), schedule=Schedule(total, 5, "cosine"),
        device=device, amp=amp, grad_clip=5.0, scaler=make_scaler(amp, device),
    )
    batch = {
        "images": torch.randn(args.batch_size, 3, args.image_size, args.image_size, device=device),
        "labels": torch.randint(args.num_classes, (args.batch_size,), device=device),
    }
    _sync(device)
    start = time.perf_counter()
    for _ in range(args.warmup):
        train_step(state, task, [batch])
    _sync(device)
    warm = time.perf_counter() - start
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times, losses = [], []
    for _ in range(args.steps):
        start = time.perf_counter()
        scalars = train_step(state, task, [batch])  # reads the loss: one sync per step
        _sync(device)
        times.append(time.perf_counter() - start)
        losses.append(scalars["loss"])
    per_step = statistics.median(times)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return {
        "model": args.model, "amp": amp, "mode": mode, "batch": args.batch_size,
        "image_size": args.image_size, "img_per_s": round(args.batch_size / per_step, 1),
        "ms_per_step": round(per_step * 1e3, 1), "warmup_s": round(warm, 1),
        "peak_mem_gib": None if peak is None else round(peak, 2),
        "loss_first": round(losses[0], 4), "loss_last": round(losses[-1], 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="clusterformer-tiny")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--num-classes", type=int, default=1000)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--amps", nargs="+", default=["bf16"], choices=["bf16", "fp16", "none"])
    parser.add_argument("--modes", nargs="+", default=["eager", "compile"],
                        choices=["eager", "compile"])
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--json", dest="json_out", default=None, help="also write rows here")
    args = parser.parse_args()

    device = torch.device(args.device)
    rows = []
    for amp in args.amps:
        for mode in args.modes:
            row = bench_one(args, amp, mode, device)
            rows.append(row)
            print(json.dumps(row), flush=True)
            torch._dynamo.reset()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
    print(f"\n{name}, torch {torch.__version__}, python {platform.python_version()}, "
          f"batch {args.batch_size}, {args.image_size}x{args.image_size}, "
          f"{args.num_classes} classes\n")
    print_report(rows, {"model": "model", "amp": "amp", "mode": "mode", "img/s": "img_per_s",
                        "ms/step": "ms_per_step", "peak GiB": "peak_mem_gib",
                        "warm-up s (incl. compile)": "warmup_s"}, args.json_out)  # fmt: skip


if __name__ == "__main__":
    main()
