"""What each ``--logger`` costs: its import, opening it in a run folder, one record, closing.

Usage::

    python benchmarks/bench_loggers.py [tensorboard mlflow wandb] [--records 200]

Each logger runs in its own process (imports are part of the cost) on a typical training record
of six scalars; prints one markdown row per logger. A logger whose package is missing prints
its one-line install hint instead.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RECORD = {"step": 0, "split": "train", "loss": 1.5, "train_top1": 50.0, "lr": 1e-3,
          "grad_norm": 3.0, "img_per_s": 40.0, "epoch": 0}  # fmt: skip
CONFIG = {"optim": {"lr": 1e-3, "weight_decay": 0.05}, "data": {"batch_size": 8}}


def measure(name: str, records: int) -> str:
    from clusterformer.engine.loggers import HOOKS
    from clusterformer.extras import MissingExtra

    start = time.perf_counter()
    try:
        hook = HOOKS[name](CONFIG)
    except MissingExtra as exc:
        return f"| {name} | {exc} | | | |"
    built = time.perf_counter()
    hook.open(Path(tempfile.mkdtemp()) / "run")
    opened = time.perf_counter()
    for step in range(1, records + 1):
        hook.write({**RECORD, "step": step})
    written = time.perf_counter()
    hook.close()
    closed = time.perf_counter()
    return (f"| {name} | {built - start:.2f} | {opened - built:.2f} | "
            f"{(written - opened) / records * 1000:.2f} | {closed - written:.2f} |")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("loggers", nargs="*", default=["tensorboard", "mlflow", "wandb"])
    parser.add_argument("--records", type=int, default=200)
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # the child
    args = parser.parse_args()
    if args.one:
        print(measure(args.loggers[0], args.records), flush=True)
        return
    print("| logger | import s | open s | ms per record | close s |")
    print("|---|---:|---:|---:|---:|")
    for name in args.loggers:
        done = subprocess.run([sys.executable, __file__, name, "--records", str(args.records),
                               "--one"], capture_output=True, text=True, timeout=600)  # fmt: skip
        print(done.stdout.strip().splitlines()[-1] if done.returncode == 0 else
              f"| {name} | failed: {done.stderr.strip().splitlines()[-1]} | | | |")  # fmt: skip


if __name__ == "__main__":
    main()
