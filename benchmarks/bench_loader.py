"""Loader throughput: images/s from WebDataset shards vs from the raw files, same transforms.

Usage::

    python benchmarks/bench_loader.py [--num-images 300] [--workers 0 2] [--task instance]
        [--image-size 320] [--batch-size 8] [--coco DIR] [--repeats 2]

Builds a ``cf make-shapes`` dataset (and shards it) in a temporary folder; also measures
``--coco`` (default: the shared COCO128 sample) when that folder exists. Each cell is the best
of ``--repeats`` full epochs, worker start-up included, and prints as a markdown table.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import tempfile
import time
from pathlib import Path

COCO128 = Path("/work/shared/datasets/coco_instances/coco128_train2017")


def epoch_rate(path: Path, task: str, args: argparse.Namespace, workers: int) -> tuple[float, int]:
    """Best images/s over ``args.repeats`` epochs, and the images per epoch."""
    from clusterformer.data import LoaderSpec, build_loader

    spec = LoaderSpec(batch_size=args.batch_size, image_size=args.image_size, train=args.train,
                      num_workers=workers, seed=0)  # fmt: skip
    loader = build_loader(path, task, spec)
    best, count = 0.0, 0
    for epoch in range(args.repeats):
        loader.set_epoch(epoch)
        start, count = time.perf_counter(), 0
        for batch in loader:
            count += int(batch["valid"].sum())
        best = max(best, count / (time.perf_counter() - start))
    return best, count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num-images", type=int, default=300)
    parser.add_argument("--shapes-size", type=int, default=256, help="make-shapes image size")
    parser.add_argument("--task", default="instance")
    parser.add_argument("--image-size", type=int, default=320)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--eval", dest="train", action="store_false", help="eval transforms")
    parser.add_argument("--coco", type=Path, default=COCO128)
    args = parser.parse_args()

    import torch
    import webdataset

    from clusterformer.data.shapes import make_shapes
    from clusterformer.data.shards import write_shards
    from clusterformer.data.streams import open_raw

    torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        datasets = []
        raw = Path(tmp) / "shapes"
        make_shapes(raw, num_images=args.num_images, image_size=args.shapes_size, seed=0)
        datasets.append((f"make-shapes {args.num_images} x {args.shapes_size}px", raw))
        if args.coco.is_dir():
            datasets.append((args.coco.name, args.coco))
        for name, folder in datasets:
            shards = Path(tmp) / f"{folder.name}-shards"
            write_shards(open_raw(folder, args.task), shards, samples_per_shard=64, seed=0)
            for workers in args.workers:
                for kind, path in (("shards", shards), ("raw", folder)):
                    rate, n = epoch_rate(path, args.task, args, workers)
                    rows.append((name, kind, workers, n, rate))
                    print(f"{name:32s} {kind:6s} workers={workers} {n:4d} images {rate:8.1f} img/s",
                          flush=True)  # fmt: skip

    mode = "train" if args.train else "eval"
    print()
    print(f"date: {datetime.date.today()}  machine: {platform.machine()}, {os.cpu_count()} CPUs, "
          f"{platform.platform()}  torch {torch.__version__}  webdataset {webdataset.__version__}")  # fmt: skip
    print(f"task {args.task}, {mode} transforms, image_size {args.image_size}, "
          f"batch {args.batch_size}, best of {args.repeats} epochs")  # fmt: skip
    print()
    print("| dataset | source | workers | images/epoch | images/s |")
    print("|---|---|---:|---:|---:|")
    for name, kind, workers, n, rate in rows:
        print(f"| {name} | {kind} | {workers} | {n} | {rate:.1f} |")


if __name__ == "__main__":
    main()
