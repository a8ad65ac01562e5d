"""Eager inference with oneDNN's packed weights (a frozen model) against plain weights, one process.

    OMP_NUM_THREADS=1 python benchmarks/bench_packed_weights.py --batch-sizes 1 8 --rounds 16

``ops.linear`` keeps oneDNN's blocked copy of every weight that requires no gradient
(``linear_op._PACKED``), so a model after ``requires_grad_(False)`` (what ``clusterformer.load``,
``cf eval`` and ``cf predict`` run) skips the weight reorder oneDNN otherwise does in every call.
This times two copies of the same model under ``torch.no_grad()``, one with trainable parameters
(oneDNN reorders every call) and one frozen, in interleaved rounds (the order alternates), and
prints medians and the median of the per-round speed-up, with the largest relative difference of
their outputs.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import torch

from clusterformer.models import create_model
from clusterformer.runtime import configure


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="clusterformer-tiny")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--rounds", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="packed_weights.json")
    args = parser.parse_args()
    print(configure(threads=args.threads), flush=True)
    torch.manual_seed(0)
    plain = create_model(args.model, num_classes=1000).eval()
    frozen = copy.deepcopy(plain).requires_grad_(False)
    results = []
    for batch in args.batch_sizes:
        x = torch.randn(batch, 3, args.image_size, args.image_size)
        times: dict[str, list[float]] = {"plain": [], "frozen": []}
        with torch.no_grad():
            want, got = plain(x), frozen(x)  # also the warm-up (and the frozen model's packing)
            diff = ((got - want).abs().max() / want.abs().max()).item()
            for index in range(args.rounds):
                order = [("plain", plain), ("frozen", frozen)]
                for name, model in order if index % 2 == 0 else order[::-1]:
                    start = time.perf_counter()
                    model(x)
                    times[name].append(time.perf_counter() - start)
        speedup = statistics.median(p / f for p, f in zip(times["plain"], times["frozen"], strict=True))
        row = {"batch_size": batch, "plain_ms": statistics.median(times["plain"]) * 1e3,
               "frozen_ms": statistics.median(times["frozen"]) * 1e3, "speedup": speedup,
               "max_rel_diff": diff, "times_s": times}
        results.append(row)
        print(f"batch {batch}: plain {row['plain_ms']:.1f} ms, frozen (packed) {row['frozen_ms']:.1f} ms, "
              f"speed-up {speedup:.3f} (median per round), outputs differ by {diff:.1e}", flush=True)
    with open(args.out, "w") as handle:
        json.dump({"torch": torch.__version__, "model": args.model, "threads": args.threads,
                   "image_size": args.image_size, "rounds": args.rounds, "rows": results}, handle, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
