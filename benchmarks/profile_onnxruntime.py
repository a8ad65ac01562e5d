"""Where ONNX Runtime spends a model's inference time: its profiler's node times by operator type.

    OMP_NUM_THREADS=1 PYTHONPATH=. /work/venv-timm/bin/python benchmarks/profile_onnxruntime.py \
        --models clusterformer-tiny timm/swin_tiny_patch4_window7_224 --runs 5

Each model is exported as ``cf benchmark --runtime onnxruntime`` exports it
(``clusterformer.export.module_to_onnx``, static ``S x S``, batch dynamic), loaded in a session
with one intra-op thread (``--threads``) and ONNX Runtime's profiler on, run ``--warmup`` times
untimed and ``--runs`` times profiled. Printed per model: the milliseconds per run of each
operator type of the optimised graph (summed over its nodes, ``Node`` events of the profile),
its share of all node time and its node count, largest first; and the whole run's wall time.
``--keep DIR`` keeps the ONNX files and the profiles' JSON there.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from clusterformer.bench import build_model, parse_model
from clusterformer.export import module_to_onnx


def profile(label: str, folder: Path, args: argparse.Namespace) -> None:
    import onnxruntime as ort

    torch.manual_seed(0)
    model = build_model(parse_model(label)).eval()
    size = args.image_size
    path = folder / (label.replace("/", "_") + ".onnx")
    if not path.exists():
        example = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
        module_to_onnx(model, example, path, output_names=("logits",), static_size=size)
    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    options.inter_op_num_threads = 1
    options.enable_profiling = True
    options.profile_file_prefix = str(folder / (label.replace("/", "_") + "-profile"))
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: torch.randn(args.batch_size, 3, size, size).numpy()}
    for _ in range(args.warmup):
        session.run(None, feed)
    start = time.perf_counter()
    for _ in range(args.runs):
        session.run(None, feed)
    wall_ms = (time.perf_counter() - start) * 1e3 / args.runs
    events = json.loads(Path(session.end_profiling()).read_text())
    # The profile also holds the warm-up runs: keep the last ``runs`` model_run events' span.
    runs = sorted((e for e in events if e.get("name") == "model_run"), key=lambda e: e["ts"])
    first = runs[-args.runs]["ts"]
    per_type: dict[str, float] = collections.defaultdict(float)
    nodes: dict[str, set[str]] = collections.defaultdict(set)
    for event in events:
        if event.get("cat") != "Node" or event["ts"] < first or not event["name"].endswith("_kernel_time"):
            continue
        op = event["args"].get("op_name", "?")
        per_type[op] += event["dur"] / 1e3 / args.runs
        nodes[op].add(event["name"])
    total = sum(per_type.values())
    print(f"\n{label}: {wall_ms:.0f} ms per run of batch {args.batch_size} (wall), "
          f"{total:.0f} ms in nodes, {sum(len(n) for n in nodes.values())} nodes")
    print("| op type | ms per run | share | nodes |")
    print("|---|---:|---:|---:|")
    for op, ms in sorted(per_type.items(), key=lambda item: -item[1])[:args.top]:
        print(f"| {op} | {ms:.1f} | {100 * ms / total:.1f} % | {len(nodes[op])} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+",
                        default=["clusterformer-tiny", "timm/swin_tiny_patch4_window7_224"])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--top", type=int, default=12)
    parser.add_argument("--keep", type=Path, default=None, help="keep files here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as scratch:
        folder = args.keep or Path(scratch)
        folder.mkdir(parents=True, exist_ok=True)
        for label in args.models:
            profile(label, folder, args)


if __name__ == "__main__":
    sys.exit(main())
