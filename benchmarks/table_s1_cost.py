"""What each Table S1 configuration costs to train, timed side by side in one process.

    OMP_NUM_THREADS=1 python benchmarks/table_s1_cost.py --budget cpu --out runs/s1-cpu
    python benchmarks/table_s1.py --budget cpu --seeds 3 --out runs/s1-cpu --report-only

The img/s a training run logs depends on whatever else ran beside it (the cpu budget runs two
harness processes, for hours). This script times every configuration of the budget in one
process instead: each is built exactly as its run is (``cf train``'s own setup, seed 0, the
budget's data, batch and image size), warmed up, and then every round times one training step
of every configuration, in an order rotated from round to round, so a slow phase of the
machine falls on all of them alike. Writes ``OUT/cost.json``: per configuration the median step
time and the median over rounds of (its step time / the adopted design's). The report
(``table_s1_report.py``) shows that ratio per row, and S1b's T = 3 against T = 1 from it.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import table_s1
import torch


def configurations(args: argparse.Namespace) -> list[tuple[str, dict[str, Any]]]:
    """``(run key, spec)`` of every distinct configuration of the budget (seed 0), adopted first."""
    budget = table_s1.BUDGETS[args.budget]
    seen: dict[str, dict[str, Any]] = {}
    for row in sorted(table_s1.rows_for(table_s1.TABLES), key=lambda r: not r.adopted):
        key = table_s1.run_dir(args.out, row, 0).name.removesuffix("-s0")
        if key not in seen:
            seen[key] = table_s1.run_spec(args, budget, row, 0)
    return list(seen.items())


def prepare(spec: dict[str, Any], folder: Path, batches: int) -> tuple[Any, Any, list[Any]]:
    """The task, training state and first ``batches`` batches of one configuration, built by
    ``cf train``'s own setup in a scratch run folder."""
    from clusterformer.engine.config_files import resolve_config
    from clusterformer.engine.distributed import DistEnv
    from clusterformer.engine.loop import prepare_training

    folder.mkdir(parents=True)
    flags = {**spec["flags"], "out": str(folder)}
    cfg = resolve_config(spec["recipe"], overrides=spec["overrides"], **flags)
    prepared = prepare_training(cfg, DistEnv(device=torch.device("cpu")), folder)
    loader = iter(prepared.train_loader)
    return prepared.task, prepared.state, [next(loader) for _ in range(batches)]


def measure(args: argparse.Namespace) -> dict[str, Any]:
    from clusterformer.bench.runner import rotations
    from clusterformer.engine.step import train_step

    torch.set_num_threads(args.threads)
    budget = table_s1.BUDGETS[args.budget]
    if budget.scenes is not None:
        table_s1.make_scenes(args.out, *budget.scenes, budget.scene_options)
    configs = configurations(args)
    built = {}
    with tempfile.TemporaryDirectory() as scratch:
        for key, spec in configs:
            built[key] = prepare(spec, Path(scratch) / key, args.batches)
    times: dict[str, list[float]] = {key: [] for key, _ in configs}
    keys = [key for key, _ in configs]
    for step, order in enumerate(itertools.islice(rotations(keys), args.warmup + args.rounds)):
        for key in order:
            task, state, batches = built[key]
            start = time.perf_counter()
            train_step(state, task, [batches[step % len(batches)]])
            if step >= args.warmup:
                times[key].append(time.perf_counter() - start)
        print(f"round {step + 1}/{args.warmup + args.rounds}", file=sys.stderr, flush=True)
    adopted = times[keys[0]]
    rows = []
    for key, spec in configs:
        median = statistics.median(times[key])
        rows.append({
            "key": key, "table": spec["row"]["table"], "variant": spec["row"]["variant"],
            "step_ms": round(median * 1e3, 2),
            "img_per_s": round(spec["flags"]["batch_size"] / median, 2),
            "time_x_adopted": round(statistics.median(
                t / a for t, a in zip(times[key], adopted, strict=True)), 4),
        })
    return {"budget": args.budget, "threads": args.threads, "rounds": args.rounds,
            "warmup": args.warmup, "torch": torch.__version__, "rows": rows}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", choices=sorted(table_s1.BUDGETS), default="cpu")
    parser.add_argument("--out", type=Path, required=True, help="the experiment's OUT")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batches", type=int, default=4, help="distinct batches cycled through")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    # table_s1.run_spec's own flags: one seed, the budget's steps, no torchrun.
    args.seeds, args.steps, args.eval_every, args.nproc_per_node = 1, None, None, 1
    args.data = args.val_data = None
    if min(args.rounds, args.batches, args.threads) < 1 or args.warmup < 0:
        parser.error("--rounds, --batches and --threads must be >= 1, --warmup >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    doc = measure(args)
    path = args.out / "cost.json"
    path.write_text(json.dumps(doc, indent=1))
    for row in doc["rows"]:
        print(f"{row['key']:45} {row['step_ms']:8.1f} ms  x{row['time_x_adopted']:.3f}")
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
