"""benchmarks/speed_per_flop.py: the acceptance table from cf benchmark's JSON rows."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import speed_per_flop as spf  # noqa: E402  (the benchmarks folder is not a package)


def _row(model: str, ms: list[float], *, gflops: float, mode: str = "infer", threads: int = 1,
         compiled: bool = False, runtime: str = "torch") -> dict:  # fmt: skip
    return {"model": model, "mode": mode, "threads": threads, "compiled": compiled,
            "runtime": runtime, "gflops": gflops, "round_ms": ms,
            "img_per_s": 8000 / sorted(ms)[len(ms) // 2]}


def _write(folder: Path, name: str, rows: list[dict]) -> None:
    (folder / f"{name}.json").write_text(json.dumps({"rows": rows}))


def test_summary_ratios_per_flop_pairs_rounds_and_targets(tmp_path):
    tiny, swin = spf.TINY, spf.SWIN
    rows = []
    for mode in ("infer", "train"):
        for threads in (1, 2):
            # Tiny takes 1.2x Swin-T's time per round: per image 1/1.2, per FLOP x 11.07/8.98.
            rows += [_row(tiny, [120.0, 240.0, 120.0], gflops=11.07, mode=mode, threads=threads),
                     _row(swin, [100.0, 200.0, 100.0], gflops=8.98, mode=mode, threads=threads)]
    _write(tmp_path, "fp32", rows)
    _write(tmp_path, "onnx", [
        _row(tiny, [100.0, 100.0, 100.0], gflops=11.07, runtime="onnxruntime"),
        _row(swin, [95.0, 95.0, 95.0], gflops=8.98, runtime="onnxruntime"),
        _row(tiny, [90.0, 90.0, 90.0], gflops=11.07)])
    _write(tmp_path, "compile", [_row(tiny, [99.0] * 3, gflops=11.07, compiled=True),
                                 _row(tiny, [100.0] * 3, gflops=11.07)])
    _write(tmp_path, "iters", [_row(tiny, [105.0, 210.0, 103.0], gflops=11.07, mode="train"),
                               _row(f"{tiny}:num_iters=1", [100.0, 200.0, 100.0], gflops=10.71,
                                    mode="train")])
    lines = spf.summary(tmp_path)
    assert len(lines) == 2 + 4 + 1 + 1 + 1  # no bf16.json: its lines are left out
    per_flop = (1 / 1.2) * 11.07 / 8.98
    assert f"| {per_flop:.3f} | >= 1 | yes |" in lines[2]
    assert "| 0.950 | >= 0.9 | yes |" in lines[6]
    assert "| 1.010 | >= 1 | yes |" in lines[7]
    assert "| 0.050 | <= 0.0381 | NO |" in lines[8]  # the median round's overhead, 5 %


def test_summary_refuses_ambiguous_rows(tmp_path):
    row = _row(spf.TINY, [1.0], gflops=1.0)
    _write(tmp_path, "compile", [row, row])
    with pytest.raises(SystemExit, match="expected one row"):
        spf.summary(tmp_path)
