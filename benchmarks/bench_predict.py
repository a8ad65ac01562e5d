"""`cf predict FOLDER` throughput: batched (DataLoader, --batch-size B --workers W; by default
cf predict's own defaults, 8 and 2) against one image at a time (--batch-size 1 --workers 0,
what cf predict did before) and batched without workers, interleaved A B C A B C
in one process so the machine's drift hits both; img/s counts the whole predict_images call
(checkpoint load, decode, model, overlays and JSON written).

    OMP_NUM_THREADS=1 python benchmarks/bench_predict.py --ckpt RUN --images FOLDER [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from clusterformer.cli.predict_cmd import expand_images, predict_images


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", type=Path, required=True)
    parser.add_argument("--images", type=Path, required=True)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    images = expand_images([args.images])
    settings = {"one-at-a-time": (1, 0), "batched": (args.batch_size, args.workers),
                "batched, no workers": (args.batch_size, 0)}  # what batching alone gives
    rates: dict[str, list[float]] = {name: [] for name in settings}
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(args.rounds):
            for name, (batch, workers) in settings.items():
                start = time.perf_counter()
                predict_images(args.ckpt, images, Path(tmp) / f"{name}-{round_}", device="cpu",
                               image_size=args.image_size, batch_size=batch, workers=workers)
                rates[name].append(len(images) / (time.perf_counter() - start))
                print(f"round {round_} {name}: {rates[name][-1]:.1f} img/s", flush=True)
    for name, values in rates.items():
        print(f"{name}: median {statistics.median(values):.1f} img/s ({len(images)} images)")
    for name in ("batched", "batched, no workers"):
        ratios = [b / a for a, b in zip(rates["one-at-a-time"], rates[name], strict=True)]
        print(f"{name} / one-at-a-time: median {statistics.median(ratios):.2f}x "
              f"(per round {', '.join(f'{r:.2f}' for r in ratios)})")


if __name__ == "__main__":
    main()
