"""ONNX files against each other in ONNX Runtime: interleaved rounds, median per-round ratios.

    # the same model exported at two revisions (profile_onnxruntime.py --keep writes the files)
    git checkout REV_A && python benchmarks/profile_onnxruntime.py --models clusterformer-tiny --keep /tmp/a
    git checkout REV_B && python benchmarks/profile_onnxruntime.py --models clusterformer-tiny --keep /tmp/b
    OMP_NUM_THREADS=1 python benchmarks/bench_onnx_files.py /tmp/a/clusterformer-tiny.onnx \
        /tmp/b/clusterformer-tiny.onnx --rounds 12

One CPU session per file (``--threads`` intra-op threads, one inter-op thread, default graph
optimisation), all fed the same random batch; each round runs every session once, in an order
rotated from round to round. Prints each file's median time, images/s and the median of its
per-round speed ratio to the first file, and the largest relative difference of its outputs
from the first file's (files of the same model and weights should agree to float32 rounding).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("files", nargs="+")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args()
    import onnxruntime as ort

    sessions = []
    for path in args.files:
        options = ort.SessionOptions()
        options.intra_op_num_threads = args.threads
        options.inter_op_num_threads = 1
        sessions.append(ort.InferenceSession(path, options, providers=["CPUExecutionProvider"]))
    shape = [args.batch_size if not isinstance(d, int) else d
             for d in sessions[0].get_inputs()[0].shape]
    images = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    feeds = [{s.get_inputs()[0].name: images} for s in sessions]
    outputs = [s.run(None, f)[0] for s, f in zip(sessions, feeds, strict=True)]
    for session, feed in zip(sessions, feeds, strict=True):
        for _ in range(args.warmup):
            session.run(None, feed)
    times: list[list[float]] = [[] for _ in sessions]
    order = list(range(len(sessions)))
    for index in range(args.rounds):
        shift = index % len(order)
        for i in order[shift:] + order[:shift]:
            start = time.perf_counter()
            sessions[i].run(None, feeds[i])
            times[i].append(time.perf_counter() - start)
    print(f"onnxruntime {ort.__version__}, {args.threads} thread(s), batch {args.batch_size}, "
          f"{args.rounds} interleaved rounds, load average {os.getloadavg()[0]:.2f} at the end")
    print("| file | ms (median) | img/s | x first file | max rel. diff to first |")
    print("|---|---:|---:|---:|---:|")
    scale = float(np.abs(outputs[0]).max())
    for path, own, out in zip(args.files, times, outputs, strict=True):
        ratio = statistics.median(f / t for t, f in zip(own, times[0], strict=True))
        median = statistics.median(own)
        diff = float(np.abs(out - outputs[0]).max()) / max(scale, 1e-12)
        print(f"| {path} | {median * 1e3:.0f} | {args.batch_size / median:.2f} | {ratio:.3f} | "
              f"{diff:.1e} |")


if __name__ == "__main__":
    sys.exit(main())
