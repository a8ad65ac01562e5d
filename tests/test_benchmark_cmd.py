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


def _cf(*args: str, tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "clusterformer.cli", *args], capture_output=True, text=True,
        cwd=tmp_path, timeout=900,
        env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "COLUMNS": "200", **env},
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


def _onnx_installed() -> bool:
    from clusterformer.export import missing_onnx_packages

    return not missing_onnx_packages()


needs_onnx = pytest.mark.skipif(not _onnx_installed(),
                                reason="needs the export extra (onnx, onnxruntime, onnxscript)")


class _LinearOnnx:
    """Stands in for ``OnnxExports`` without the slow export: every model's "graph" is one
    hand-made ONNX product ``images (B, 3*S*S) -> logits (B, 1000)``."""

    def __init__(self, folder: Path, image_size: int) -> None:
        import numpy as np
        import onnx
        from onnx import TensorProto, helper, numpy_helper

        features = 3 * image_size * image_size
        weight = numpy_helper.from_array(
            np.random.default_rng(0).standard_normal((features, 1000)).astype(np.float32), "w")
        graph = helper.make_graph(
            [helper.make_node("Flatten", ["images"], ["flat"]),
             helper.make_node("MatMul", ["flat", "w"], ["logits"])], "linear",
            [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["B", 3, image_size, image_size])],
            [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["B", 1000])], [weight])
        self.path = folder / "linear.onnx"
        onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), self.path)
        self.calls: list[tuple[str, int]] = []

    def runner(self, spec, threads, images, note):  # noqa: ANN001, ANN201 - OnnxExports' API
        from clusterformer.bench.onnx_runtime import OrtRunner

        self.calls.append((spec.label, threads))
        return OrtRunner(spec, self.path, threads, images, params_m=3.0, max_rel_diff=0.0)


@needs_onnx
def test_measure_times_onnxruntime_runners_in_the_inference_rounds(tmp_path):
    # Fails on the code before --runtime: measure took no ``onnx``.
    cfg = BenchConfig(batch_size=2, image_size=32, rounds=3, warmup=1, memory=False,
                      threads=(1, 2), modes=("infer",))
    onnx = _LinearOnnx(tmp_path, 32)
    rows = measure([parse_model(NANO)], cfg, onnx=onnx)
    assert onnx.calls == [(NANO, 1), (NANO, 2)]  # a session per thread count
    assert [(r["threads"], r["runtime"]) for r in rows] == [
        (1, "torch"), (1, "onnxruntime"), (2, "torch"), (2, "onnxruntime")]
    for row in rows[1::2]:
        assert row["model"] == NANO and row["baseline"] == NANO and not row["compiled"]
        assert row["rounds"] == 3 and row["ms_min"] <= row["ms_median"] <= row["ms_max"]
        assert row["speed_vs_baseline"] > 0 and row["onnx_max_rel_diff"] == 0.0
    # The ratio column compares with the eager baseline, not the ONNX Runtime runner.
    assert rows[0]["speed_vs_baseline"] == 1.0


@pytest.mark.slow  # exports nano to ONNX: about a minute on a loaded 2-core machine
@needs_onnx
def test_onnxruntime_rows_are_timed_with_the_eager_ones(tmp_path):
    # Fails on the code before --runtime (no such option: exit 2).
    out, scratch = tmp_path / "bench.json", tmp_path / "tmp"
    scratch.mkdir()
    done = _cf("benchmark", "--model", NANO, "--runtime", "onnxruntime", "--image-size", "32",
               "--batch-size", "2", "--rounds", "2", "--warmup", "1", "--mode", "both",
               "--threads", "1", "--no-memory", "--out", str(out), tmp_path=tmp_path,
               TMPDIR=str(scratch))
    assert done.returncode == 0, done.stderr
    assert f"{NANO} onnxruntime" in done.stdout and "warning" not in done.stdout
    rows = json.loads(out.read_text())["rows"]
    # Inference: eager and onnxruntime in the same rounds; training: eager only.
    assert [(r["mode"], r["runtime"]) for r in rows] == [
        ("infer", "torch"), ("infer", "onnxruntime"), ("train", "torch")]
    ort = rows[1]
    assert ort["model"] == NANO and not ort["compiled"] and ort["baseline"] == NANO
    assert len({ort["rounds"], rows[0]["rounds"]}) == 1 and ort["speed_vs_baseline"] > 0
    assert ort["params_m"] == rows[0]["params_m"]  # the same model
    # The session computes the eager model's logits (cf export's parity tolerance).
    assert ort["onnx_max_rel_diff"] <= 1e-4
    assert "onnx_max_rel_diff" not in rows[0]
    assert not list(scratch.glob("cf-benchmark-onnx-*")), "the exported files were left behind"


def test_onnxruntime_missing_is_a_note_not_an_error(tmp_path):
    # An "onnxruntime" package that cannot be imported, first on the path.
    hidden = tmp_path / "hidden" / "onnxruntime"
    hidden.mkdir(parents=True)
    (hidden / "__init__.py").write_text("raise ImportError('hidden by the test')\n")
    out = tmp_path / "bench.json"
    done = _cf("benchmark", "--model", NANO, "--runtime", "onnxruntime", "--image-size", "32",
               "--batch-size", "1", "--rounds", "1", "--warmup", "1", "--mode", "infer",
               "--no-memory", "--out", str(out), tmp_path=tmp_path,
               PYTHONPATH=str(tmp_path / "hidden"))
    assert done.returncode == 0, done.stderr
    assert "onnxruntime not installed, so no ONNX Runtime rows" in done.stdout
    assert "clusterformer[export]" in done.stdout
    assert [r["runtime"] for r in json.loads(out.read_text())["rows"]] == ["torch"]


def test_help_names_the_extras_to_install(tmp_path):
    # Rich markup once ate "[bench]", so the help said: pip install 'clusterformer'.
    done = _cf("benchmark", "--help", tmp_path=tmp_path)
    assert done.returncode == 0
    text = " ".join(line.strip("│ ") for line in done.stdout.splitlines())
    assert "pip install 'clusterformer[timm]'" in text
    assert "pip install 'clusterformer[export]'" in text


@pytest.mark.parametrize("args, message", [
    (["--mode", "fast"], "--mode must be one of"),
    (["--rounds", "0"], "--rounds must be >= 1"),
    (["--model", "clusterformer-huge"], "unknown model 'clusterformer-huge'"),
    (["--amp", "fp8"], "--amp must be one of"),
    (["--runtime", "tensorrt"], "--runtime must be one of eager, onnxruntime"),
    (["--runtime", "onnxruntime", "--mode", "train"], "use --mode infer or both"),
    (["--runtime", "onnxruntime", "--amp", "bf16"], "use --amp none"),
])
def test_cli_usage_errors_are_one_line_and_exit_2(tmp_path, args, message):
    done = _cf("benchmark", *args, "--no-memory", tmp_path=tmp_path)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0]
