"""A trained classifier's logits three ways on held-out images: eager float32, eager under bf16
autocast, and its ONNX export (``cf export``, float32) in ONNX Runtime. Prints top-1 of each and
how far bf16 and ONNX are from eager float32 (docs/benchmarks.md, "bf16 and ONNX parity").

    python benchmarks/bf16_parity.py RUN [RUN ...] --images FOLDER [--onnx-dir DIR]

FOLDER is an image folder (one sub-folder per class, named as the checkpoint's classes). Needs
the export extra (onnx, onnxruntime): the peer-benchmark venv of the README.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

import clusterformer
from clusterformer.data.paths import join_inside
from clusterformer.export.parity import onnx_runner
from clusterformer.inference.inputs import decode_input


def images_and_labels(folder: Path, classes: list[str], mean, std) -> tuple[torch.Tensor, torch.Tensor]:
    """Every image of the folder as one normalised float32 batch, with its class index."""
    tensors, labels = [], []
    for index, name in enumerate(classes):
        # Class names come from the checkpoint: each must name a folder inside FOLDER.
        for path in sorted(join_inside(folder, name, "class name").iterdir()):
            tensors.append(decode_input(path)[0])  # size-limited decode, RGB uint8 (3, H, W)
            labels.append(index)
    batch = torch.stack(tensors).float() / 255.0
    mean, std = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    return (batch - mean) / std, torch.tensor(labels)


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    """``max|a - b| / max|b|``: the export parity check's measure."""
    return float((a - b).abs().max() / b.abs().max())


def measure(run: Path, folder: Path, onnx_dir: Path) -> dict[str, float | int]:
    predictor = clusterformer.load(run, device="cpu")
    meta, model = predictor.metadata, predictor.model.eval()
    norm = meta["normalisation"]
    classes = [c["name"] for c in meta["categories"]]
    images, labels = images_and_labels(folder, classes, norm["mean"], norm["std"])
    onnx = onnx_dir / f"{run.name}.onnx"
    subprocess.run([sys.executable, "-m", "clusterformer.cli", "export", "--ckpt", str(run),
                    "--format", "onnx", "--out", str(onnx),
                    "--image-size", str(images.shape[-1])], check=True)  # fmt: skip
    with torch.no_grad():
        fp32 = torch.cat([model(chunk) for chunk in images.split(64)])
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = torch.cat([model(chunk).float() for chunk in images.split(64)])
    run_onnx = onnx_runner(onnx, ["logits"])
    ort = torch.cat([run_onnx(chunk)[0] for chunk in images.split(64)])
    top1 = {name: float((out.argmax(-1) == labels).float().mean() * 100)
            for name, out in (("fp32", fp32), ("bf16", bf16), ("onnx", ort))}
    return {
        "images": len(labels), **{f"top1_{k}": round(v, 2) for k, v in top1.items()},
        "bf16_vs_fp32_rel": relative(bf16, fp32), "onnx_vs_fp32_rel": relative(ort, fp32),
        "bf16_agrees_fp32": float((bf16.argmax(-1) == fp32.argmax(-1)).float().mean() * 100),
        "onnx_agrees_fp32": float((ort.argmax(-1) == fp32.argmax(-1)).float().mean() * 100),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", type=Path, nargs="+", help="run folders of classifiers")
    parser.add_argument("--images", type=Path, required=True, help="held-out image folder")
    parser.add_argument("--onnx-dir", type=Path, default=None, help="keep the exports here")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as scratch:
        onnx_dir = args.onnx_dir or Path(scratch)
        onnx_dir.mkdir(parents=True, exist_ok=True)
        for run in args.runs:
            row = measure(run, args.images, onnx_dir)
            print(f"{run}: " + ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}"
                                         for k, v in row.items()), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
