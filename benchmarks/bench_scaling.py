"""`cf train` throughput on 1 process against N under torchrun (data-parallel scaling).

    python benchmarks/bench_scaling.py --procs 1 2 --rounds 3             # CPU, 1 thread each
    python benchmarks/bench_scaling.py --procs 1 2 4 8 --device cuda \
        --model clusterformer-tiny --image-size 224 --batch-size 64 --amp bf16 --workers 4

Runs the real command line end to end (loader, DDP, logging) on synthetic shapes shards
made once in a temporary folder: each process count trains ``--steps`` steps with the same
per-process batch (so the global batch grows with the processes, as with more GPUs), one
thread per process (``OMP_NUM_THREADS=1``) unless ``--threads`` says otherwise. Process
counts alternate within each round (interleaved), so a busy machine slows each alike. The
speed of a run is the median of the ``img_per_s`` it logged after the first ``--skip`` steps
(global images per second over all ranks); printed per process count: the median over rounds,
and the ratio to the first count's.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path


def make_data(root: Path, num_images: int, size: int) -> Path:
    from clusterformer.data.formats import open_source
    from clusterformer.data.shapes import make_shapes
    from clusterformer.data.shards import write_shards

    made = make_shapes(root / "raw", num_images=num_images, image_size=size, seed=0)
    write_shards(open_source("imagefolder", Path(made["classes"])), root / "shards",
                 samples_per_shard=64)  # fmt: skip
    return root / "shards"


def run_once(args: argparse.Namespace, procs: int, data: Path, out: Path) -> float:
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(procs)]
    command = [sys.executable, *launcher, "-m", "clusterformer.cli", "train",
               "--task", "classification", "--data", str(data), "--out", str(out),
               "--model", args.model, "--image-size", str(args.image_size),
               "--batch-size", str(args.batch_size), "--steps", str(args.steps),
               "--log-every", "1", "--num-workers", str(args.workers), "--lr", "1e-3",
               *(["--device", args.device] if args.device else []),
               *(["--amp", args.amp] if args.amp else [])]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"bench_scaling: {procs} processes failed:\n{done.stderr[-2000:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    speeds = [r["img_per_s"] for r in rows if r.get("split") == "train" and r["step"] > args.skip]
    return statistics.median(speeds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--procs", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--skip", type=int, default=5, help="warm-up steps left out")
    parser.add_argument("--model", default="clusterformer-nano")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16, help="per process")
    parser.add_argument("--num-images", type=int, default=2048)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default=None)
    parser.add_argument("--amp", default=None)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    speeds: dict[int, list[float]] = {p: [] for p in args.procs}
    with tempfile.TemporaryDirectory() as tmp:
        data = make_data(Path(tmp), args.num_images, max(args.image_size, 32))
        for r in range(args.rounds):
            for p in args.procs:
                speeds[p].append(run_once(args, p, data, Path(tmp) / f"run-{r}-{p}"))
                print(f"round {r + 1}: {p} process(es) {speeds[p][-1]:.1f} img/s", flush=True)
    base = statistics.median(speeds[args.procs[0]])
    rows = []
    for p in args.procs:
        median = statistics.median(speeds[p])
        rows.append({"procs": p, "img_per_s": median, "ratio": median / base, "rounds": speeds[p]})
        print(f"{p} process(es): {median:.1f} img/s, x{median / base:.2f} of {args.procs[0]}")
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)},
                                         "rows": rows}, indent=2) + "\n")  # fmt: skip


if __name__ == "__main__":
    main()
