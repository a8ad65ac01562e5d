"""CPU inference throughput of an exported model: eager vs torch.compile vs onnxruntime.

    python benchmarks/bench_export.py                      # the export section of docs/benchmarks.md
    python benchmarks/bench_export.py --cases nano-cls-224 --batches 1 --iters 5

Each case builds a freshly initialised model (weights do not change the speed), wraps it as
``cf export`` does (raw head outputs, aux outputs dropped), and times ``images -> outputs``
for: eager PyTorch (``torch.no_grad``), ``torch.compile`` (inductor, static shapes, compile
time excluded) and onnxruntime's CPU provider on the dynamic-shape ONNX file ``cf export``
writes (dynamo exporter, opset 18). Reported: median seconds per batch over ``--iters`` runs
after ``--warmup`` runs, as images per second. All three use ``--threads`` CPU threads.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

CASES = {
    "nano-cls-224": ("clusterformer-nano", "classification", 224, 1000),
    "tiny-cls-224": ("clusterformer-tiny", "classification", 224, 1000),
    "nano-det-320": ("clusterformer-nano", "detection", 320, 80),
}


def _time(fn: Callable[[], object], warmup: int, iters: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_case(name: str, batches: list[int], warmup: int, iters: int, threads: int,
               backends: list[str]) -> list[dict]:
    import onnxruntime as ort

    from clusterformer.export import graph, writer
    from clusterformer.models import create_model
    from clusterformer.tasks import task_spec

    preset, task, size, classes = CASES[name]
    torch.manual_seed(0)
    model = create_model(preset, task=task, num_classes=classes).eval()
    heads = task_spec(task).export
    eager = graph.ExportWrapper(model, heads, False).eval()
    rows = []
    session = None
    if "onnxruntime" in backends:
        example = torch.randn(2, 3, size, size)
        started = time.perf_counter()
        program = writer.export_program(graph.build_wrapper(model, heads, False), example, None)
        path = Path(tempfile.mkdtemp()) / f"{name}.onnx"
        writer.save_onnx(program, eager, example, path, static_size=None, opset=18,
                         output_names=heads.raw_names)
        export_s = time.perf_counter() - started
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        print(f"{name}: exported to ONNX in {export_s:.0f}s", flush=True)
    for batch in batches:
        images = torch.randn(batch, 3, size, size)
        row = {"case": name, "batch": batch}
        with torch.no_grad():
            if "eager" in backends:
                row["eager"] = batch / _time(lambda x=images: eager(x), warmup, iters)
            if "compile" in backends:
                compiled = torch.compile(eager, dynamic=False)
                started = time.perf_counter()
                compiled(images)
                row["compile_s"] = time.perf_counter() - started
                row["compile"] = batch / _time(lambda f=compiled, x=images: f(x), warmup, iters)
        if session is not None:
            feed = {"images": images.numpy()}
            row["onnxruntime"] = batch / _time(lambda x=feed: session.run(None, x), warmup, iters)
        print(json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in row.items()}),
              flush=True)
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--backends", nargs="+", default=["eager", "compile", "onnxruntime"],
                        choices=["eager", "compile", "onnxruntime"])
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import onnxruntime

    print(f"torch {torch.__version__}, onnxruntime {onnxruntime.__version__}, "
          f"python {platform.python_version()}, {platform.machine()}, threads {args.threads}")
    rows = []
    for name in args.cases:
        rows += bench_case(name, args.batches, args.warmup, args.iters, args.threads, args.backends)
    print("\n| case | batch | eager img/s | torch.compile img/s | onnxruntime img/s |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        cells = [f"{r[k]:.1f}" if k in r else "-" for k in ("eager", "compile", "onnxruntime")]
        print(f"| {r['case']} | {r['batch']} | " + " | ".join(cells) + " |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
