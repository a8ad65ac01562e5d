"""benchmarks/bf16_parity.py: a trained classifier's logits eager fp32, bf16 autocast and ONNX."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("onnxruntime")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bf16_parity  # noqa: E402  (the benchmarks folder is not a package)

import clusterformer  # noqa: E402


def _class_folder(task_runs: dict) -> Path:
    # make-shapes writes its image-folder copy (one sub-folder per class) beside `images/`.
    return Path(task_runs["images"][0]).parent.parent / "classes"


# A benchmark tool's check (an ONNX export in a subprocess): the export's own parity is in
# test_export.py's default tests.
@pytest.mark.slow
def test_parity_rows_agree_with_the_predictor_and_the_export(task_runs: dict, tmp_path: Path,
                                                             capsys, monkeypatch) -> None:  # fmt: skip
    run, folder = task_runs["classification"], _class_folder(task_runs)
    row = bf16_parity.measure(run, folder, tmp_path)
    assert (tmp_path / f"{run.name}.onnx").is_file()
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    assert row["images"] == len(files) > 0
    # The ONNX export is the eager float32 model (the export's own parity bound).
    assert row["onnx_vs_fp32_rel"] <= 1e-4 and row["onnx_agrees_fp32"] == 100.0
    assert row["top1_onnx"] == row["top1_fp32"]
    # bf16 keeps 8 bits of mantissa: close to fp32, not equal to it.
    assert 0.0 < row["bf16_vs_fp32_rel"] < 0.1
    # Top-1 counts each image against the checkpoint's class order, as the model's own logits
    # on the same normalised batch do.
    predictor = clusterformer.load(run, device="cpu")
    meta = predictor.metadata
    classes = [c["name"] for c in meta["categories"]]
    norm = meta["normalisation"]
    images, labels = bf16_parity.images_and_labels(folder, classes, norm["mean"], norm["std"])
    assert [classes[i] for i in labels] == [p.parent.name for p in files]
    with torch.no_grad():
        expected = (predictor.model.eval()(images).argmax(-1) == labels).float().mean() * 100
    assert row["top1_fp32"] == round(float(expected), 2)
    # The command prints one line per run (the export is not made twice: measure is done).
    monkeypatch.setattr(bf16_parity, "measure", lambda *args: row)
    assert bf16_parity.main([str(run), "--images", str(folder)]) == 0
    assert capsys.readouterr().out == (
        f"{run}: images {row['images']}, top1_fp32 {row['top1_fp32']:.3g}, "
        f"top1_bf16 {row['top1_bf16']:.3g}, top1_onnx {row['top1_onnx']:.3g}, "
        f"bf16_vs_fp32_rel {row['bf16_vs_fp32_rel']:.3g}, onnx_vs_fp32_rel {row['onnx_vs_fp32_rel']:.3g}, "
        f"bf16_agrees_fp32 {row['bf16_agrees_fp32']:.3g}, onnx_agrees_fp32 {row['onnx_agrees_fp32']:.3g}\n"
    )
