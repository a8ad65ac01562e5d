"""``cf benchmark`` and ``clusterformer.bench``: model specs, the interleaved
measurement, its JSON, and the CLI's errors. Nano at 32-48 px keeps every call fast; speed
itself is never asserted (docs/benchmarks.md holds the measured numbers)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from clusterformer.bench.models import build_model, count_gflops, parse_model, timm_available
from clusterformer.bench.runner import BenchConfig, measure

NANO = "clusterformer-nano"


def test_parse_model_reads_presets_overrides_and_timm_names():
    assert parse_model(NANO).overrides == {}
    spec = parse_model(f"{NANO}:num_iters=1,head_pool=concat,grad_checkpointing=true")
    assert spec.source == "clusterformer" and spec.name == NANO
    assert spec.overrides == {"num_iters": 1, "head_pool": "concat", "grad_checkpointing": True}
    timm = parse_model("timm/resnet50")
    assert (timm.source, timm.name, timm.label) == ("timm", "resnet50", "timm/resnet50")


@pytest.mark.parametrize("spec", ["clusterformer-huge", f"{NANO}:num_iters", f"{NANO}:=1"])
def test_parse_model_rejects_unknown_presets_and_malformed_overrides(spec):
    with pytest.raises(ValueError):
        parse_model(spec)


def test_build_model_applies_overrides_and_grad_checkpointing():
    model = build_model(parse_model(f"{NANO}:num_iters=1,grad_checkpointing=true"))
    assert model.grad_checkpointing
    assert all(block.mixer.num_iters == 1 for stage in model.stages for block in stage)
    assert model.head.out_features == 1000


def test_measure_interleaves_every_model_and_mode():
    cfg = BenchConfig(batch_size=2, image_size=32, rounds=3, warmup=1, memory=False)
    specs = [parse_model(NANO), parse_model(f"{NANO}:num_iters=1")]
    rows = measure(specs, cfg)
    assert [(r["mode"], r["model"]) for r in rows] == [
        ("infer", NANO), ("infer", f"{NANO}:num_iters=1"),
        ("train", NANO), ("train", f"{NANO}:num_iters=1"),
    ]
    for row in rows:
        assert row["rounds"] == 3 and row["baseline"] == NANO and not row["compiled"]
        assert row["ms_min"] <= row["ms_median"] <= row["ms_max"]
        assert row["img_per_s"] == pytest.approx(2 / (row["ms_median"] / 1e3))
        assert row["gflops"] > 0 and row["params_m"] > 1
    # The baseline's ratio to itself is exactly one in every round.
    assert [r["speed_vs_baseline"] for r in rows if r["model"] == NANO] == [1.0, 1.0]


def test_gflops_are_counted_through_the_fast_paths():
    """The oneDNN product is invisible to FlopCounterMode unless ops.linear steps aside."""
    tiny = count_gflops(parse_model("clusterformer-tiny"), 224)
    assert tiny == pytest.approx(11.07, abs=0.01)  # docs/benchmarks.md, cf models
    # One clustering iteration instead of three: fewer FLOPs.
    assert count_gflops(parse_model("clusterformer-tiny:num_iters=1"), 224) < tiny


def test_measure_rejects_a_baseline_that_is_not_measured():
    cfg = BenchConfig(batch_size=1, image_size=32, rounds=1, warmup=1, memory=False,
                      modes=("infer",))
    with pytest.raises(ValueError, match="--baseline"):
        measure([parse_model(NANO)], cfg, baseline="timm/resnet50")


def test_memory_is_measured_in_a_process_of_its_own():
    cfg = BenchConfig(batch_size=1, image_size=32, rounds=1, warmup=1, memory=True,
                      modes=("train",))
    (row,) = measure([parse_model(NANO)], cfg)
    # torch alone makes a process of well over 100 MiB; a call allocates something.
    assert row["peak_rss_mib"] > 100
    assert 0 <= row["call_rise_mib"] < row["peak_rss_mib"]


def _cf(*args: str, tmp_path: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "clusterformer.cli", *args], capture_output=True, text=True,
        cwd=tmp_path, timeout=900, env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"},
    )


def test_cli_prints_a_table_and_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    done = _cf("benchmark", "--model", NANO, "--image-size", "32", "--batch-size", "1",
               "--rounds", "2", "--warmup", "1", "--mode", "infer", "--no-memory",
               "--out", str(out), tmp_path=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("cf: cpu, 1 thread (OMP_NUM_THREADS)")
    assert "clusterformer-nano" in done.stdout and f"wrote {out}" in done.stdout
    doc = json.loads(out.read_text())
    assert doc["machine"]["torch"] == torch.__version__
    assert doc["settings"]["rounds"] == 2 and doc["settings"]["modes"] == ["infer"]
    assert len(doc["rows"]) == 1 and doc["rows"][0]["threads"] == 1


@pytest.mark.skipif(timm_available(), reason="checks the note printed without timm")
def test_peers_without_timm_is_a_note_not_an_error(tmp_path):
    done = _cf("benchmark", "--model", NANO, "--peers", "--image-size", "32", "--batch-size",
               "1", "--rounds", "1", "--warmup", "1", "--mode", "infer", "--no-memory",
               "--out", str(tmp_path / "b.json"), tmp_path=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "timm is not installed" in done.stdout


@pytest.mark.parametrize("args, message", [
    (["--mode", "fast"], "--mode must be one of"),
    (["--rounds", "0"], "--rounds must be >= 1"),
    (["--model", "clusterformer-huge"], "unknown model 'clusterformer-huge'"),
    (["--amp", "fp8"], "--amp must be one of"),
])
def test_cli_usage_errors_are_one_line_and_exit_2(tmp_path, args, message):
    done = _cf("benchmark", *args, "--no-memory", tmp_path=tmp_path)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0]
