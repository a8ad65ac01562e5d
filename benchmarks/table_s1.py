"""The supplement's Table S1 as panoptic training runs: every row of its six sub-tables, per seed.

    # harness check: every row, two seeds, synthetic scenes, minutes (numbers mean nothing)
    OMP_NUM_THREADS=1 python benchmarks/table_s1.py --budget smoke --seeds 2 --out /tmp/s1-smoke
    # the CPU-scale experiment: nano on 64 px synthetic scenes, a fixed step budget, >= 3 seeds;
    # resumable: rerun the same command to go on. Two such commands may run side by side on the
    # same OUT (each run is claimed by one process): the two cores, one thread each.
    OMP_NUM_THREADS=1 python benchmarks/table_s1.py --budget cpu --seeds 3 --out runs/s1-cpu
    # calibration of the step budget: the baseline's and the adopted design's PQ curves
    OMP_NUM_THREADS=1 python benchmarks/table_s1.py --budget cpu --seeds 1 --tables a \
        --steps 2400 --eval-every 400 --out runs/s1-calibration
    # full scale: Tiny on COCO panoptic shards (`cf shard-dataset --format coco-panoptic`), the
    # recipe's batch of 2 per GPU on 8 GPUs = the paper's 16
    python benchmarks/table_s1.py --budget gpu --seeds 3 --out runs/s1-gpu --nproc-per-node 8 \\
        --data coco/shards-train --val-data coco/shards-val
    # the report alone (tables, paired comparison, PNG) from what has finished
    python benchmarks/table_s1.py --budget cpu --seeds 3 --out runs/s1-cpu --report-only
    # keep every finished run's records (no checkpoints, no data: kilobytes) in a folder that is
    # committed; a later command with the same --archive on a fresh machine takes them back and
    # trains only what is missing. The report can be rebuilt from the archive alone. An OUT or
    # archive is one experiment on one code (code.json): after main has moved on, go on with a
    # venv holding the experiment's commit (`pip install` of a worktree of it) and its python.
    OMP_NUM_THREADS=1 python benchmarks/table_s1.py --budget cpu --seeds 3 --out runs/s1-cpu \
        --archive benchmarks/results/table_s1_cpu
    python benchmarks/table_s1.py --budget cpu --seeds 3 --report-only \
        --out benchmarks/results/table_s1_cpu

What each row changes and the budgets: ``table_s1_rows.py``.

Each run is a child process (``--child``) in ``OUT/runs/<row>-s<seed>/``: the engine writes its
``config.json`` and ``metrics.jsonl`` there and the harness writes ``result.json`` beside them
(PQ, PQ_th, PQ_st, SQ, RQ, training img/s, peak memory). A run with a ``result.json`` is finished
and never rerun; its ``spec.json`` must match the command's settings (an OUT is one experiment).
``OUT/table_s1.json`` holds every finished row (DESIGN.md section 4c) and the report
(``table_s1_report.py``) writes ``OUT/report.md`` and ``OUT/table_s1.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # the sibling scripts (imported as a module too)

from table_s1_archive import (  # noqa: E402
    check_same_code,
    code_fingerprint,
    copy_finished,
    copy_record,
    write_json,
)

# The rows and budgets, also read from here (table_s1.ROWS, .BUDGETS) by the cost script and tests.
from table_s1_rows import ADOPTED, BUDGETS, ROWS, TABLES, Budget, Row, rows_for  # noqa: E402, F401


def run_dir(out: Path, row: Row, seed: int) -> Path:
    return out / "runs" / f"{row.key}-s{seed}"


def run_spec(args: argparse.Namespace, budget: Budget, row: Row, seed: int) -> dict[str, Any]:
    """Everything the child needs to train one row with one seed (and what the report shows)."""
    data = _data_paths(args)
    flags = {**budget.flags, "data": data[0], "val_data": data[1], "seed": seed,
             "out": str(run_dir(args.out, row, seed))}
    if args.steps is not None:
        flags["steps"] = args.steps
    # Evaluate once, after training, unless a calibration asks for the curve.
    flags["eval_every"] = args.eval_every or flags.get("steps")
    spec = {"recipe": budget.recipe, "flags": flags, "threads": budget.threads,
            "overrides": {**budget.overrides, **ADOPTED, **row.overrides},
            "row": {"table": row.table, "variant": row.variant, "key": row.key}}
    if args.nproc_per_node > 1:
        spec["nproc_per_node"] = args.nproc_per_node
    return spec


def _data_paths(args: argparse.Namespace) -> tuple[str, str]:
    if args.data:
        return str(args.data), str(args.val_data or args.data)
    return str(args.out / "data" / "shards-train"), str(args.out / "data" / "shards-val")


def make_scenes(out: Path, num_train: int, num_val: int, options: dict[str, Any]) -> None:
    """Synthetic 64 px panoptic scenes (``cf make-shapes``'s) for both splits, once."""
    from clusterformer.data import make_shapes, open_source, write_shards

    for split, count, seed in (("train", num_train, 0), ("val", num_val, 1000)):
        shards = out / "data" / f"shards-{split}"
        if (shards / "dataset.json").exists():
            continue
        made = make_shapes(out / "data" / f"raw-{split}", num_images=count, image_size=64,
                           seed=seed, kinds=("scenes",), **options)
        source = open_source("coco-panoptic", made["images"], made["panoptic_json"],
                             made["panoptic_masks"])
        write_shards(source, shards)


def run_one(spec: dict[str, Any], timeout: float | None) -> dict[str, Any]:
    """Train one row in a child process; returns (and writes) its ``result.json`` record.

    A child per run: peak memory is the run's own (``wait4``'s max RSS, and CUDA's peak from the
    child), a crash costs one row, and nothing leaks from one run into the next."""
    folder = Path(spec["flags"]["out"])
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "spec.json").write_text(json.dumps(spec, indent=1))
    env = {**os.environ, "OMP_NUM_THREADS": str(spec["threads"])}
    command = [str(Path(__file__).resolve()), "--child", str(folder / "spec.json")]
    nproc = spec.get("nproc_per_node", 1)
    # Several GPUs: one process per GPU through torchrun, as `cf train` runs under it.
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    start = time.perf_counter()
    with open(folder / "child.log", "w") as log:
        child = subprocess.Popen([sys.executable, *(launcher if nproc > 1 else []), *command],
                                 stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            _, status, usage = _wait(child, timeout)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
            raise RuntimeError(f"{folder}: no result after {timeout} s (see child.log)") from None
    child_record = folder / "child.json"
    if status != 0 or not child_record.exists():
        raise RuntimeError(f"{folder}: training failed (exit {status}); see {folder / 'child.log'}")
    record = json.loads(child_record.read_text())
    record["peak_rss_mib"] = round(usage.ru_maxrss / 1024, 1)  # Linux: KiB
    record["wall_s"] = round(time.perf_counter() - start, 1)
    write_json(folder / "result.json", record)
    return record


def _wait(child: subprocess.Popen, timeout: float | None):
    """``os.wait4`` with a timeout: the child's exit status and its own resource usage."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        pid, status, usage = os.wait4(child.pid, os.WNOHANG)
        if pid == child.pid:
            child.returncode = os.waitstatus_to_exitcode(status)
            return pid, child.returncode, usage
        if deadline is not None and time.monotonic() > deadline:
            raise subprocess.TimeoutExpired(child.args, timeout)
        time.sleep(0.2)


def child_main(spec_path: Path) -> None:
    """Inside the child: train, evaluate, write ``child.json`` (metrics, img/s, GPU peak)."""
    import torch

    from clusterformer.engine.checkpoint_format import RunLayout, holds_weights
    from clusterformer.engine.config_files import resolve_config
    from clusterformer.engine.loop import train

    spec = json.loads(spec_path.read_text())
    torch.set_num_threads(spec["threads"])
    # A run a killed harness left behind: continue from its newest checkpoint, or (none yet)
    # start over, clearing its logs so metrics.jsonl holds one run.
    folder = Path(spec["flags"]["out"])
    again = holds_weights(RunLayout(folder).checkpoints)
    cfg = resolve_config(spec["recipe"], overrides=spec["overrides"], **spec["flags"],
                         resume=again, restart=not again)
    start = time.perf_counter()
    result = train(cfg, handle_signals=False)
    if os.environ.get("RANK", "0") != "0":
        return  # under torchrun: rank 0 reports (evaluation metrics are already global)
    metrics = result.metrics
    record = {**spec["row"], "seed": spec["flags"]["seed"], "step": result.step,
              **{k: float(metrics[k]) for k in ("PQ", "PQ_th", "PQ_st", "SQ", "RQ")},
              "train_img_per_s": train_speed(folder / "metrics.jsonl"),
              "train_eval_s": round(time.perf_counter() - start, 1)}
    if torch.cuda.is_available():
        record["peak_gpu_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    write_json(folder / "child.json", record)


def train_speed(metrics_jsonl: Path) -> float | None:
    """Median training img/s over the logged windows after the first (warm-up) one."""
    speeds = []
    for line in metrics_jsonl.read_text().splitlines():
        entry = json.loads(line)
        if "img_per_s" in entry:
            speeds.append(float(entry["img_per_s"]))
    speeds = speeds[1:] or speeds
    return round(statistics.median(speeds), 2) if speeds else None


def collect(out: Path, rows: list[Row], seeds: int) -> list[dict[str, Any]]:
    """Every finished (row, seed), in table order; the adopted run appears under each table."""
    found = []
    for row in rows:
        for seed in range(seeds):
            result = run_dir(out, row, seed) / "result.json"
            if result.exists():
                record = json.loads(result.read_text())
                found.append({**record, "table": row.table, "variant": row.variant,
                              "adopted": row.adopted, "paper_PQ": row.paper[0],
                              "paper_PQ_th": row.paper[1], "paper_PQ_st": row.paper[2]})
    return found


def run_all(args: argparse.Namespace) -> int:
    """Train every unfinished (row, seed) not claimed by another harness process on the same
    OUT (two may run side by side); returns how many failed."""
    budget = BUDGETS[args.budget]
    if budget.scenes is not None and not args.data:
        make_scenes(args.out, *budget.scenes, budget.scene_options)
    if args.archive is not None:
        taken = copy_finished(args.archive, args.out)
        if taken:
            print(f"{len(taken)} finished run(s) taken back from {args.archive}", flush=True)
    failed, done = 0, set()
    for seed in range(args.seeds):
        # The adopted design first: every other row of the seed is compared with it.
        for row in sorted(rows_for("".join(args.tables)), key=lambda r: not r.adopted):
            folder = run_dir(args.out, row, seed)
            if folder.name in done:
                continue  # the adopted design (and S1a's "+ RCA") is one run per seed
            done.add(folder.name)
            spec = run_spec(args, budget, row, seed)
            if (folder / "result.json").exists():
                check_same_spec(folder, spec)
                continue  # finished: never rerun
            if not claim(folder):
                continue  # another harness process is training it
            try:
                record = run_one(spec, args.timeout)
                if args.archive is not None:
                    copy_record(folder, args.archive / "runs" / folder.name)
                print(f"{folder.name}: PQ {record['PQ']:.2f} ({record['wall_s']} s)", flush=True)
            except RuntimeError as err:
                failed += 1
                print(f"error: {err}", file=sys.stderr, flush=True)
            finally:
                (folder / "claim").unlink(missing_ok=True)
    return failed


def check_same_spec(folder: Path, spec: dict[str, Any]) -> None:
    """A finished run must have been trained with today's settings: an OUT is one experiment
    (a changed budget, --steps or data would mix two experiments in one table)."""
    written = _settings(json.loads((folder / "spec.json").read_text()))
    if written != _settings(json.loads(json.dumps(spec))):
        raise SystemExit(f"error: {folder}: finished with other settings than this command's "
                         "(budget, --steps, --eval-every or data); use another --out")


def _settings(spec: dict[str, Any]) -> dict[str, Any]:
    """What of a spec is a setting: not the row's label (the adopted design's run is shared by
    every sub-table, and each names it its own way: "ClusterFormer (both)" in S1a, "T=3" in
    S1b, ...), and paths relative to the OUT the run was trained in (a run archived on one
    machine and taken back into another OUT is the same run)."""
    flags = dict(spec["flags"])
    out = str(Path(flags["out"]).parent.parent)
    for key, value in flags.items():
        if isinstance(value, str) and (value == out or value.startswith(out + os.sep)):
            flags[key] = "<OUT>" + value[len(out):]
    return {**{k: v for k, v in spec.items() if k != "row"}, "flags": flags}


def claim(folder: Path) -> bool:
    """Take the run for this process (a ``claim`` file holding its pid), unless a live process
    holds it; a claim left by a process that died is taken over."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "claim"
    for _ in range(2):
        try:
            with open(path, "x") as handle:
                handle.write(str(os.getpid()))
            return True
        except FileExistsError:
            try:
                owner = int(path.read_text() or "0")
                os.kill(owner, 0)
                return False  # alive: its run
            except (ValueError, ProcessLookupError):
                path.unlink(missing_ok=True)  # a dead process's claim
            except PermissionError:
                return False
    return False


def write_table(args: argparse.Namespace, out: Path | None = None) -> Path:
    """``table_s1.json`` of the finished runs in ``out`` (default: ``--out``)."""
    out = args.out if out is None else out
    rows = collect(out, rows_for("".join(args.tables)), args.seeds)
    path = out / "table_s1.json"
    write_json(path, {"budget": args.budget, "seeds": args.seeds, "steps": args.steps, "rows": rows,
                      "recipe": BUDGETS[args.budget].recipe,
                      "shared_overrides": {**BUDGETS[args.budget].overrides, **ADOPTED}})
    return path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", choices=sorted(BUDGETS), required=True)
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0 .. N-1 per row")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--data", type=Path, help="training shards (gpu budget: required)")
    parser.add_argument("--val-data", type=Path, help="held-out shards (default: --data)")
    parser.add_argument("--tables", nargs="+", default=list(TABLES), choices=list(TABLES))
    parser.add_argument("--steps", type=int, default=None,
                        help="training steps per run instead of the budget's (calibration)")
    parser.add_argument("--eval-every", type=int, default=None,
                        help="also evaluate every N steps (calibration: the PQ curve)")
    parser.add_argument("--nproc-per-node", type=int, default=1,
                        help="GPUs per run (gpu budget: 8 = the paper's batch of 16)")
    parser.add_argument("--timeout", type=float, default=None,
                        help="seconds per run before it is killed and counted as failed")
    parser.add_argument("--archive", type=Path, default=None,
                        help="keep each finished run's records (kilobytes) here, take back those "
                             "missing from --out first, and write the report here too")
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args(argv)
    if args.seeds < 1:
        parser.error("--seeds must be >= 1")
    if any(n is not None and n < 1 for n in (args.steps, args.eval_every, args.nproc_per_node)):
        parser.error("--steps, --eval-every and --nproc-per-node must be >= 1")
    if args.budget == "gpu" and not args.data:
        parser.error("the gpu budget trains on COCO panoptic shards: give --data")
    for given in (args.data, args.val_data):
        if given is not None and not (given / "dataset.json").exists():
            parser.error(f"{given}: no dataset.json (not a folder of shards)")
    return args


def main(argv: list[str] | None = None) -> int:
    if argv is None and len(sys.argv) == 3 and sys.argv[1] == "--child":
        child_main(Path(sys.argv[2]))
        return 0
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.report_only or args.archive is not None:  # training, or archiving runs
        fingerprint = code_fingerprint()
        for folder in (args.out, args.archive):
            if folder is not None:
                check_same_code(folder, fingerprint)
    failed = 0 if args.report_only else run_all(args)
    from table_s1_report import write_report  # this folder: the scripts run from it

    if args.archive is not None:
        copy_finished(args.out, args.archive)  # also runs finished by a harness without it
    for out in (args.out, args.archive) if args.archive is not None else (args.out,):
        table = write_table(args, out)
        print(f"{table}\n{write_report(table, out)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
