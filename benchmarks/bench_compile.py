"""Compiled against eager inference, before and after a change to ``ops.linear``.

    OMP_NUM_THREADS=1 python benchmarks/bench_compile.py --baseline-rev 7f7a326 --rounds 10
    OMP_NUM_THREADS=1 python benchmarks/bench_compile.py --amp bf16 --rounds 10

Runners, each built once: the model eager, the model compiled as ``cf eval --compile`` compiles
it (inductor, ``freezing=True``: ``engine.compiled.compile_model``) and, with ``--baseline-rev
REV``, compiled with ``ops/fused_linear.py`` as it was at git revision ``REV`` (its linears
routed through that version while tracing, as in ``bench_amp.py``). Every compiled runner is
compared with eager on the first batch (relative max difference, printed). Timed in interleaved
rounds (one call of each per round, in a rotated order), so a load change on the shared machine
falls on all of them alike; ratios are medians of the per-round ratios against eager. Compile
time (the first call) is printed too.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable

import torch

from clusterformer.bench import build_model, parse_model
from clusterformer.engine.compiled import compile_model, max_relative_difference

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_amp import linear_version, load_linear_at  # noqa: E402 - a sibling script


class Runner:
    def __init__(self, label: str, model: torch.nn.Module, linear: Callable | None,
                 amp: str, compiled: bool) -> None:  # fmt: skip
        self.label, self.linear, self.amp = label, linear, amp
        self.model = compile_model(model, inference=True) if compiled else model
        self.times: list[float] = []
        self.first_s = 0.0

    def call(self, images: torch.Tensor) -> torch.Tensor:
        autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.amp == "bf16")
        with linear_version(self.linear), torch.no_grad(), autocast:
            return self.model(images)

    def timed(self, images: torch.Tensor) -> None:
        start = time.perf_counter()
        self.call(images)
        self.times.append(time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="clusterformer-tiny")
    parser.add_argument("--baseline-rev", default=None, help="git revision of the 'before' linear")
    parser.add_argument("--amp", default="none", choices=["none", "bf16"])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    model = build_model(parse_model(args.model)).eval()
    images = torch.randn(args.batch_size, 3, args.image_size, args.image_size,
                         generator=torch.Generator().manual_seed(0))
    runners = [Runner("eager", model, None, args.amp, compiled=False)]
    if args.baseline_rev:
        runners.append(Runner(f"compiled, linear of {args.baseline_rev}", model,
                              load_linear_at(args.baseline_rev), args.amp, compiled=True))
    runners.append(Runner("compiled (this tree)", model, None, args.amp, compiled=True))
    reference = runners[0].call(images)
    for runner in runners:
        start = time.perf_counter()
        out = runner.call(images)
        runner.first_s = time.perf_counter() - start
        diff, _ = max_relative_difference(out, reference)
        print(f"{runner.label}: first call {runner.first_s:.1f} s, "
              f"max rel. difference to eager {diff:.1e}", flush=True)
        for _ in range(args.warmup - 1):
            runner.call(images)
    for index in range(args.rounds):
        shift = index % len(runners)
        for runner in runners[shift:] + runners[:shift]:
            runner.timed(images)

    eager = runners[0]
    print(f"{args.model}, torch {torch.__version__}, {platform.machine()}, {args.threads} "
          f"thread(s), batch {args.batch_size}, {args.image_size} px, amp {args.amp}, "
          f"{args.rounds} interleaved rounds, load average {os.getloadavg()[0]:.2f} at the end")
    print("| runner | img/s | ms (median) | x eager (median of per-round ratios) | first call s |")
    print("|---|---:|---:|---:|---:|")
    for runner in runners:
        median = statistics.median(runner.times)
        ratio = statistics.median(e / r for r, e in zip(runner.times, eager.times, strict=True))
        print(f"| {runner.label} | {args.batch_size / median:.2f} | {median * 1e3:.0f} | "
              f"{ratio:.3f} | {runner.first_s:.0f} |")


if __name__ == "__main__":
    sys.exit(main())
