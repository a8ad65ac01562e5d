"""Process settings (threads, allocator, the start line of compute commands) and the compile
check that compares a compiled model with eager on the first batch."""

from __future__ import annotations

import copy
import math
import os
import platform
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from clusterformer.engine.compiled import (
    CheckedCompile,
    CompileMismatchError,
    max_relative_difference,
)
from clusterformer.engine.runtime import configure_threads, runtime_line, tune_cpu_allocator
from clusterformer.models.layers import DropPath

REPO = Path(__file__).resolve().parents[1]
LEGACY_CKPT = REPO / "tests" / "fixtures" / "legacy" / "classification.safetensors"
START_LINE = re.compile(r"^cf: cpu, 1 thread \(--threads\), torch \S+$")


@pytest.fixture(autouse=True)
def _keep_thread_count():
    """configure_threads changes the whole test process: put the count back after each test."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


# --- configure_threads -----------------------------------------------------------------------


def test_explicit_threads_win_over_the_environment(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    torch.set_num_threads(1)
    assert configure_threads(3) == (3, "--threads")
    assert torch.get_num_threads() == 3


def test_omp_num_threads_is_used_without_an_argument(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    torch.set_num_threads(1)  # so the call has something to change
    assert configure_threads() == (2, "OMP_NUM_THREADS")
    assert torch.get_num_threads() == 2


def test_without_argument_or_environment_the_count_is_kept(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    torch.set_num_threads(2)
    assert configure_threads() == (2, "default: one per core")
    assert torch.get_num_threads() == 2


@pytest.mark.parametrize("threads", [0, -1])
def test_a_count_below_one_is_rejected(threads):
    before = torch.get_num_threads()
    with pytest.raises(ValueError, match="--threads must be >= 1"):
        configure_threads(threads)
    assert torch.get_num_threads() == before


@pytest.mark.parametrize("value", ["0", "-2", "abc", "1.5"])
def test_a_bad_omp_num_threads_is_rejected(monkeypatch, value):
    monkeypatch.setenv("OMP_NUM_THREADS", value)
    with pytest.raises(ValueError, match=f"OMP_NUM_THREADS must be a positive integer, got '{value}'"):
        configure_threads()


def test_runtime_line_names_device_count_and_source():
    line = runtime_line("cpu", (1, "--threads"))
    assert line == f"cpu, 1 thread (--threads), torch {torch.__version__}"
    assert runtime_line("cpu", (4, "OMP_NUM_THREADS")).startswith("cpu, 4 threads (OMP_NUM_THREADS)")


# --- tune_cpu_allocator ----------------------------------------------------------------------


@pytest.mark.parametrize("value", ["system", "SYSTEM"])
def test_allocator_setting_is_skipped_on_request(monkeypatch, value):
    # Returns before touching malloc, so it is safe in the test process.
    monkeypatch.setenv("CF_CPU_ALLOCATOR", value)
    assert tune_cpu_allocator() is False


def test_allocator_setting_is_skipped_under_a_preloaded_allocator(monkeypatch):
    monkeypatch.delenv("CF_CPU_ALLOCATOR", raising=False)
    monkeypatch.setenv("LD_PRELOAD", "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2")
    assert tune_cpu_allocator() is False


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                    reason="the allocator setting is glibc-only")
def test_allocator_setting_applies_on_glibc_in_a_child_process():
    # In a child: mallopt changes the allocator of the whole process for good.
    env = {k: v for k, v in os.environ.items() if k not in ("CF_CPU_ALLOCATOR", "LD_PRELOAD")}
    code = ("from clusterformer.engine.runtime import tune_cpu_allocator; "
            "print(tune_cpu_allocator())")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "True"


# --- clusterformer.runtime.configure: the same settings for a library user ------------------


def test_configure_sets_threads_and_leaves_the_allocator_on_request(monkeypatch):
    import clusterformer.runtime

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    settings = clusterformer.runtime.configure(threads=1, allocator=False)
    assert torch.get_num_threads() == 1
    assert str(settings) == "cpu, 1 thread (threads=1), allocator: unchanged (allocator=False)"
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert clusterformer.runtime.configure(allocator=False).threads_from == "OMP_NUM_THREADS"
    assert torch.get_num_threads() == 2
    with pytest.raises(ValueError, match="must be >= 1"):
        clusterformer.runtime.configure(threads=0, allocator=False)


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                    reason="the allocator setting is glibc-only")
def test_configure_in_a_script_gives_cfs_settings():
    # A user's script: importing clusterformer changes nothing, configure() does what cf does.
    env = {k: v for k, v in os.environ.items()
           if k not in ("CF_CPU_ALLOCATOR", "LD_PRELOAD", "OMP_NUM_THREADS")}
    code = ("import torch, clusterformer.runtime, clusterformer.models; "
            "before = torch.get_num_threads(); "
            "print(clusterformer.runtime.configure(threads=1)); "
            "print(before, torch.get_num_threads())")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr
    line, counts = done.stdout.strip().splitlines()
    assert line == "cpu, 1 thread (threads=1), allocator: keeps freed memory"
    assert counts.split()[1] == "1"


# --- the start line of compute commands ------------------------------------------------------


def test_start_compute_prints_one_line_on_stdout(monkeypatch, capsys):
    from clusterformer.cli.runtime_opts import start_compute

    monkeypatch.setenv("CF_CPU_ALLOCATOR", "system")  # leave this process's malloc alone
    assert start_compute("cpu", threads=1) == (1, "--threads")
    out, err = capsys.readouterr()
    assert START_LINE.match(out.rstrip("\n")) and out.count("\n") == 1, out
    assert err == ""


@pytest.fixture(scope="module")
def class_folder(tmp_path_factory) -> Path:
    """An ImageFolder of 4 make-shapes pictures, 32 px (the cheapest data cf eval reads)."""
    from clusterformer.data.shapes import make_shapes

    made = make_shapes(tmp_path_factory.mktemp("rt") / "raw", num_images=4, image_size=32, seed=0)
    return Path(made["classes"])


def _cf(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    # A child process: cf sets threads and the allocator of the process it runs in.
    base = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "clusterformer.cli", *args],
                          env={**base, **(env or {})}, capture_output=True, text=True, timeout=300)


def test_cf_eval_prints_the_start_line_first(class_folder):
    # cf eval --ckpt on the legacy fixture checkpoint: the cheapest command reaching
    # start_compute that also completes (no training, no tracing).
    done = _cf("--threads", "1", "eval", "--ckpt", str(LEGACY_CKPT), "--data", str(class_folder),
               "--batch-size", "4", "--image-size", "32")
    assert done.returncode == 0, done.stderr
    first = done.stdout.splitlines()[0]
    assert START_LINE.match(first), first
    assert "top1" in done.stdout
    assert done.stderr == ""


def test_cf_error_after_the_start_line_is_one_line_on_stderr(class_folder, tmp_path):
    missing = tmp_path / "missing.safetensors"
    done = _cf("--threads", "1", "eval", "--ckpt", str(missing), "--data", str(class_folder))
    assert done.returncode == 1
    assert START_LINE.match(done.stdout.splitlines()[0]), done.stdout
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("cf: error: ") and str(missing) in lines[0]


def test_cf_bad_omp_num_threads_is_one_cf_error_line(class_folder):
    done = _cf("eval", "--ckpt", str(LEGACY_CKPT), "--data", str(class_folder),
               env={"OMP_NUM_THREADS": "abc"})
    assert done.returncode == 1
    assert "cf: cpu" not in done.stdout  # nothing ran
    # libgomp itself warns about the variable at load time, before cf runs: count cf's lines.
    ours = [line for line in done.stderr.splitlines() if line.startswith("cf:")]
    assert ours == ["cf: error: OMP_NUM_THREADS must be a positive integer, got 'abc'"], done.stderr


# --- CheckedCompile --------------------------------------------------------------------------


class Counting(nn.Module):
    """``2 x + 1`` (times ``factor``); counts its calls and records its mode at each."""

    def __init__(self, factor: float = 1.0, drop: float = 0.0) -> None:
        super().__init__()
        self.factor = factor
        self.weight = nn.Parameter(torch.tensor(2.0))
        self.drop = DropPath(drop)
        self.calls: list[bool] = []  # self.training at each call

    def forward(self, x: torch.Tensor) -> dict[str, object]:
        self.calls.append(self.training)
        y = self.drop(self.weight * x + 1) * self.factor
        return {"y": y, "parts": [y.sum(), y.argmax(dim=-1)]}


def test_a_compiled_model_that_differs_raises_a_one_line_error():
    eager = Counting()
    checked = CheckedCompile(Counting(factor=1.01), eager, what="classification model")
    with pytest.raises(CompileMismatchError) as info:
        checked(torch.randn(2, 5))
    message = str(info.value)
    assert "\n" not in message and len(message) < 300, message
    assert "classification model" in message and "--compile" in message
    assert CompileMismatchError.exit_code == 1


def test_a_matching_compiled_model_is_checked_once():
    eager, compiled = Counting(), Counting()
    checked = CheckedCompile(compiled, eager)
    x = torch.randn(2, 5)
    for _ in range(3):
        out = checked(x)
    assert len(eager.calls) == 1  # the eager reference runs on the first call only
    assert len(compiled.calls) == 3
    assert torch.equal(out["y"], compiled(x)["y"])


def test_a_difference_within_tolerance_passes():
    checked = CheckedCompile(Counting(factor=1 + 1e-6), Counting(), tolerance=1e-4)
    checked(torch.randn(3, 4))
    assert checked.checked


def test_a_stochastic_training_model_is_compared_in_eval_mode():
    torch.manual_seed(0)
    eager = Counting(drop=0.5)
    compiled = copy.deepcopy(eager)  # its own random draws: train-mode outputs would differ
    checked = CheckedCompile(compiled, eager).train()
    x = torch.randn(64, 3)
    checked(x)
    assert eager.calls == [False]  # compared without drop path
    assert compiled.calls == [False, True]  # then the real, training-mode forward
    assert checked.training and eager.training and compiled.training


def test_a_deterministic_training_model_is_compared_in_training_mode():
    eager, compiled = Counting(), Counting()
    checked = CheckedCompile(compiled, eager).train()
    out = checked(torch.randn(2, 3))
    assert eager.calls == [True] and compiled.calls == [True]  # no second compiled call
    assert out["y"].requires_grad  # the training forward keeps its graph


# --- max_relative_difference -----------------------------------------------------------------


def test_max_relative_difference_of_nested_outputs_names_the_worst_tensor():
    want = {"logits": torch.tensor([1.0, -4.0]), "aux": [torch.tensor([10.0]),
                                                        {"boxes": torch.ones(2, 2)}]}
    got = copy.deepcopy(want)
    got["aux"][1]["boxes"] = torch.tensor([[1.0, 1.0], [1.0, 1.5]])  # 0.5 / 1 = 0.5
    got["logits"] = torch.tensor([1.0, -4.4])  # 0.4 / 4 = 0.1
    diff, where = max_relative_difference(got, want)
    assert diff == pytest.approx(0.5) and where == "aux[1].boxes"
    assert max_relative_difference(want, copy.deepcopy(want)) == (0.0, "")


def test_max_relative_difference_structure_and_shape_mismatches_are_infinite():
    a = {"x": torch.zeros(2, 3)}
    assert max_relative_difference({"y": torch.zeros(2, 3)}, a)[0] == math.inf
    assert max_relative_difference([torch.zeros(2, 3)], [torch.zeros(2, 3)] * 2)[0] == math.inf
    assert max_relative_difference({"x": torch.zeros(3, 2)}, a) == (math.inf, "x")


def test_max_relative_difference_nan_where_eager_is_finite_is_infinite():
    want = torch.tensor([1.0, 2.0, float("nan")])
    assert max_relative_difference(torch.tensor([1.0, float("nan"), float("nan")]), want)[0] \
        == math.inf
    assert max_relative_difference(torch.tensor([1.0, 2.0, 3.0]), want)[0] == math.inf
    # The same non-finite positions: compared on the finite ones.
    assert max_relative_difference(torch.tensor([1.0, 2.2, float("nan")]), want)[0] \
        == pytest.approx(0.1)


def test_max_relative_difference_of_integer_tensors_is_exact():
    labels = torch.tensor([3, 1, 2])
    assert max_relative_difference(labels, labels.clone())[0] == 0.0
    assert max_relative_difference(torch.tensor([3, 1, 0]), labels)[0] == math.inf
    masks = torch.tensor([True, False])
    assert max_relative_difference(~masks, masks)[0] == math.inf


def test_max_relative_difference_is_relative_to_the_largest_eager_value():
    want = torch.tensor([1000.0, 1e-3])
    # 1e-2 off on a small entry is tiny next to the largest value.
    assert max_relative_difference(torch.tensor([1000.0, 1.1e-2]), want)[0] \
        == pytest.approx(1e-5, rel=1e-3)
