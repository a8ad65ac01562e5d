"""Every CPU speed target of docs/benchmarks.md ("Speed per FLOP") in one command.

    OMP_NUM_THREADS=1 /path/to/timm-venv/bin/python benchmarks/speed_per_flop.py --out runs/speed
    python benchmarks/speed_per_flop.py --out runs/speed --summary-only   # the table again

Runs ``cf benchmark`` five times, each one process with interleaved rounds (a slow phase of
the machine falls on every model of a round alike), and writes each run's JSON to OUT:

    fp32.json     eager fp32, inference and training step, tiny and Swin-T, 1 and 2 threads
    bf16.json     the same under bf16 autocast
    onnx.json     ONNX Runtime fp32 against eager, inference, one intra-op thread
    compile.json  tiny compiled (inductor, frozen weights) against tiny eager, inference
    iters.json    tiny's training step with T = 3 against T = 1, 16 rounds

A run whose JSON exists is not repeated (delete it to measure again). Then prints, and writes
to OUT/summary.md, one line per target: the per-image ratio to Swin-T (median of per-round
ratios), the same per FLOP (tiny has more FLOPs per image), the target and whether it is met.
Needs timm (Swin-T) and the export extra (ONNX Runtime): the peer-benchmark venv of the README.
Time it on a quiet machine: nothing else running (``uptime`` well below 1 at the start).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

TINY, SWIN = "clusterformer-tiny", "timm/swin_tiny_patch4_window7_224"
RUNS: dict[str, list[str]] = {
    "fp32": ["--model", TINY, "--model", SWIN, "--mode", "both", "--threads", "1", "--threads", "2",
             "--rounds", "12"],
    "bf16": ["--model", TINY, "--model", SWIN, "--mode", "both", "--threads", "1", "--threads", "2",
             "--rounds", "12", "--amp", "bf16"],
    "onnx": ["--model", TINY, "--model", SWIN, "--mode", "infer", "--threads", "1",
             "--rounds", "12", "--runtime", "onnxruntime"],
    "compile": ["--model", TINY, "--mode", "infer", "--threads", "1", "--rounds", "12",
                "--compile"],
    "iters": ["--model", TINY, "--model", f"{TINY}:num_iters=1", "--mode", "train",
              "--threads", "1", "--rounds", "16"],
}


def run(name: str, out: Path) -> Path:
    path = out / f"{name}.json"
    if path.exists():
        return path
    baseline = SWIN if SWIN in RUNS[name] else TINY  # the printed table's "x base" column
    command = [sys.executable, "-m", "clusterformer.cli", "benchmark", *RUNS[name], "--no-memory",
               "--baseline", baseline, "--out", str(path)]
    print("$ " + " ".join(command), flush=True)
    subprocess.run(command, check=True, env={**os.environ, "COLUMNS": "120"})
    return path


def paired_ratio(num: dict[str, Any], den: dict[str, Any]) -> float:
    """Median over rounds of ``num``'s speed / ``den``'s (both timed in the same rounds)."""
    return statistics.median(d / n for n, d in zip(num["round_ms"], den["round_ms"], strict=True))


def pick(rows: list[dict[str, Any]], **want: Any) -> dict[str, Any]:
    found = [r for r in rows if all(r.get(k) == v for k, v in want.items())]
    if len(found) != 1:
        raise SystemExit(f"error: expected one row with {want}, found {len(found)}")
    return found[0]


def summary(out: Path) -> list[str]:
    """The table: one line per target, from whichever JSON files exist in ``out``."""
    lines = ["| check | img/s | reference img/s | speed ratio | measured | target | met |",
             "|---|---:|---:|---:|---:|---:|---|"]

    def add(check: str, a: dict[str, Any], b: dict[str, Any], measured: float, target: str,
            met: bool) -> None:  # fmt: skip
        lines.append(f"| {check} | {a['img_per_s']:.2f} | {b['img_per_s']:.2f} | "
                     f"{paired_ratio(a, b):.3f} | {measured:.3f} | {target} | "
                     f"{'yes' if met else 'NO'} |")

    for amp in ("fp32", "bf16"):
        path = out / f"{amp}.json"
        if not path.exists():
            continue
        rows = json.loads(path.read_text())["rows"]
        for mode in ("infer", "train"):
            for threads in (1, 2):
                key = {"mode": mode, "threads": threads, "compiled": False, "runtime": "torch"}
                tiny, swin = pick(rows, model=TINY, **key), pick(rows, model=SWIN, **key)
                per_flop = paired_ratio(tiny, swin) * tiny["gflops"] / swin["gflops"]
                add(f"eager {amp} {mode}, {threads} thread{'s' * (threads > 1)}: tiny x Swin-T, "
                    "per FLOP", tiny, swin, per_flop, ">= 1", per_flop >= 1.0)
    # Two rows of one run against each other, per image: (file, check, row, reference, target).
    pairs = (
        ("onnx", "ONNX Runtime fp32, 1 thread: tiny x Swin-T, per image",
         {"model": TINY, "mode": "infer", "threads": 1, "runtime": "onnxruntime"},
         {"model": SWIN, "mode": "infer", "threads": 1, "runtime": "onnxruntime"}, 0.9),
        ("compile", "compiled tiny x eager tiny, inference, 1 thread",
         {"model": TINY, "mode": "infer", "threads": 1, "compiled": True},
         {"model": TINY, "mode": "infer", "threads": 1, "compiled": False}, 1.0),
    )
    for name, check, want, reference, target in pairs:
        if (out / f"{name}.json").exists():
            rows = json.loads((out / f"{name}.json").read_text())["rows"]
            row, ref = pick(rows, **want), pick(rows, **reference)
            ratio = paired_ratio(row, ref)
            add(check, row, ref, ratio, f">= {target:g}", ratio >= target)
    if (out / "iters.json").exists():
        rows = json.loads((out / "iters.json").read_text())["rows"]
        t3, t1 = pick(rows, model=TINY), pick(rows, model=f"{TINY}:num_iters=1")
        overhead = 1 / paired_ratio(t3, t1) - 1  # T = 3's extra time over T = 1's, per round
        add("T = 3 training-step time over T = 1, minus 1", t3, t1, overhead, "<= 0.0381",
            overhead <= 0.0381)
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for the JSON files")
    parser.add_argument("--only", nargs="*", choices=sorted(RUNS), default=sorted(RUNS),
                        help="measure only these runs")
    parser.add_argument("--summary-only", action="store_true", help="measure nothing")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.summary_only:
        for name in args.only:
            run(name, args.out)
    lines = summary(args.out)
    (args.out / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
