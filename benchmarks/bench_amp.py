"""bf16 autocast against float32 on the CPU, before and after a change to ``ops.linear``.

    OMP_NUM_THREADS=1 python benchmarks/bench_amp.py --baseline-rev abe8b4c --rounds 10
    OMP_NUM_THREADS=1 /work/venv-timm/bin/python benchmarks/bench_amp.py --peers \
        timm/swin_tiny_patch4_window7_224          # a peer, from a venv that has timm

Every (model, linear version, precision, mode) runner is built once, then timed in interleaved
rounds (one call of each runner per round, in a rotated order), so that a load change on a
shared machine falls on all of them alike; ratios are medians of the per-round ratios (the
fp32 before/after ratio, the same code twice, shows the noise). ``--baseline-rev REV`` loads
``clusterformer/ops/fused_linear.py`` as it was at git revision ``REV`` and routes the
ClusterFormer model's linears through it for the "before" runners. A training step is forward
under autocast, float32 cross-entropy, backward, AdamW step (as ``cf benchmark``'s). Prints
medians, images/s, the bf16 / float32 speed-up of each pair, each runner against the first model's
"after" runner of its mode and precision and, with peers, against the first peer; ``--json
FILE`` writes the rows with every round's time.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from clusterformer.bench import build_model, parse_model

# The modules that call ``linear`` by the name they imported.
LINEAR_USERS = ("clusterformer.ops.clustering", "clusterformer.models.layers",
                "clusterformer.models.mixer")


def load_linear_at(rev: str) -> Callable:
    """``linear`` from ``ops/fused_linear.py`` at git revision ``rev``."""
    root = Path(__file__).resolve().parents[1]
    source = subprocess.run(["git", "show", f"{rev}:clusterformer/ops/fused_linear.py"],
                            cwd=root, check=True, capture_output=True, text=True).stdout
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as handle:
        handle.write(source)
    spec = importlib.util.spec_from_file_location(f"fused_linear_{rev}", handle.name)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # torch.compile re-imports the modules it traces, by name
    spec.loader.exec_module(module)
    os.unlink(handle.name)
    return module.linear


@contextlib.contextmanager
def linear_version(fn: Callable | None):
    """Route the model's linears through ``fn`` (None: the installed one) for the block."""
    if fn is None:
        yield
        return
    modules = [importlib.import_module(name) for name in LINEAR_USERS]
    saved = [module.linear for module in modules]
    for module in modules:
        module.linear = fn
    try:
        yield
    finally:
        for module, original in zip(modules, saved, strict=True):
            module.linear = original


class Runner:
    def __init__(self, label: str, model_name: str, linear: Callable | None, amp: bool,
                 mode: str, batch: int, size: int) -> None:
        self.label, self.linear, self.amp, self.mode = label, linear, amp, mode
        torch.manual_seed(0)
        self.model = build_model(parse_model(model_name)).train(mode == "train")
        self.images = torch.randn(batch, 3, size, size)
        self.labels = torch.randint(0, 1000, (batch,))
        self.optimizer = (torch.optim.AdamW(self.model.parameters(), lr=1e-4)
                          if mode == "train" else None)
        self.times: list[float] = []

    def call(self) -> None:
        autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.amp)
        with linear_version(self.linear):
            if self.optimizer is None:
                with torch.no_grad(), autocast:
                    self.model(self.images)
                return
            with autocast:
                logits = self.model(self.images)
            F.cross_entropy(logits.float(), self.labels).backward()
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)

    def timed(self) -> None:
        start = time.perf_counter()
        self.call()
        self.times.append(time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--baseline-rev", default=None, help="git revision of the 'before' linear")
    parser.add_argument("--peers", nargs="*", default=[], help="timm/<name> models, 'after' only")
    parser.add_argument("--models", nargs="*", default=["clusterformer-tiny"])
    parser.add_argument("--modes", nargs="+", default=["infer", "train"], choices=["infer", "train"])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", dest="json_out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    versions: list[tuple[str, Callable | None]] = [("after", None)]
    if args.baseline_rev:
        versions.insert(0, (f"before ({args.baseline_rev})", load_linear_at(args.baseline_rev)))
    runners = []
    for mode in args.modes:
        for name in args.models:
            for version, fn in versions:
                for amp in (False, True):
                    runners.append(Runner(f"{name} {version}", name, fn, amp, mode,
                                          args.batch_size, args.image_size))
        for name in args.peers:
            for amp in (False, True):
                runners.append(Runner(name, name, None, amp, mode, args.batch_size,
                                      args.image_size))
    for runner in runners:
        for _ in range(args.warmup):
            runner.call()
    for index in range(args.rounds):
        shift = index % len(runners)
        for runner in runners[shift:] + runners[:shift]:
            runner.timed()

    def speedup(runner: Runner, base: Runner) -> float:
        """Median over rounds of base's time / runner's time (same round, same load)."""
        return statistics.median(b / r for r, b in zip(runner.times, base.times, strict=True))

    def reference(runner: Runner, label: str) -> Runner:
        return next(r for r in runners if r.label == label and r.mode == runner.mode
                    and r.amp == runner.amp)

    after = f"{args.models[0]} after" if args.models else runners[0].label
    peer = args.peers[0] if args.peers else None
    rows = []
    for runner in runners:
        median = statistics.median(runner.times)
        rows.append({"model": runner.label, "mode": runner.mode,
                     "amp": "bf16" if runner.amp else "fp32", "ms_median": median * 1e3,
                     "img_per_s": args.batch_size / median, "threads": args.threads,
                     "x_after": speedup(runner, reference(runner, after)),
                     "x_peer": speedup(runner, reference(runner, peer)) if peer else None,
                     "round_s": runner.times})
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{args.threads} thread(s), batch {args.batch_size}, {args.image_size} px, "
          f"{args.rounds} interleaved rounds, load average {os.getloadavg()[0]:.2f} at the end")
    print(f"| model | mode | fp32 img/s | bf16 img/s | bf16 / fp32 | x {after} (fp32, bf16) |"
          + (f" x {peer} (fp32, bf16) |" if peer else ""))
    print("|---|---|---:|---:|---:|---:|" + ("---:|" if peer else ""))
    pairs = zip(runners[::2], runners[1::2], rows[::2], rows[1::2], strict=True)
    for fp32, bf16, fp32_row, bf16_row in pairs:
        line = (f"| {fp32.label} | {fp32.mode} | {fp32_row['img_per_s']:.2f} | "
                f"{bf16_row['img_per_s']:.2f} | {speedup(bf16, fp32):.2f}x | "
                f"{fp32_row['x_after']:.2f}, {bf16_row['x_after']:.2f} |")
        if peer:
            line += f" {fp32_row['x_peer']:.2f}, {bf16_row['x_peer']:.2f} |"
        print(line)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    sys.exit(main())
