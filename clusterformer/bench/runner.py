"""Timing models side by side in one process (``cf benchmark``).

Every model runs in the same process, on the same input, with the same thread count. The
timed calls are interleaved: each round times one call of every model (a batch's forward, or
a whole AdamW training step), in an order that rotates from round to round. A slow phase
of the machine (another job, a noisy neighbour) then falls on every model of that round alike.
Speeds are medians over rounds; ratios are medians of the per-round ratios against a baseline
model, so they survive drifts that move every model. The training step is cross-entropy on
fixed labels, ``backward`` and one AdamW step (lr 1e-4, weight decay 0.05) by the
implementation ``cf train`` uses (torch's fused kernel on CPU and CUDA), the same for every
model.

Peak memory. On CUDA, ``torch.cuda.max_memory_allocated`` over a model's timed calls. On CPU
each eager model is run once more in a fresh process of its own
(:mod:`clusterformer.bench.memory_probe`), and the row reports that process's peak resident
memory (``VmHWM``) and how far it rose during the call: torch keeps no CPU allocation
statistics, and one process running several models cannot tell whose memory is whose.
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from clusterformer.bench.models import (
    NUM_CLASSES,
    ModelSpec,
    build_model,
    count_gflops,
    timm_available,
)
from clusterformer.engine.optim import fused_supported

if TYPE_CHECKING:
    from clusterformer.bench.onnx_runtime import OnnxExports

MODES: tuple[str, ...] = ("infer", "train")


@dataclass
class BenchConfig:
    """What to measure. ``threads`` None keeps the process's current thread count."""

    batch_size: int = 8
    image_size: int = 224
    rounds: int = 8
    warmup: int = 2
    modes: tuple[str, ...] = MODES
    compile: bool = False
    amp: str = "none"
    device: str = "cpu"
    threads: tuple[int, ...] | None = None
    memory: bool = True
    seed: int = 0


def _autocast(amp: str, device: torch.device):
    if amp == "none":
        return torch.autocast(device.type, enabled=False)
    return torch.autocast(device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Runner:
    """One model in one mode (eager or compiled): ``call()`` runs one timed unit."""

    runtime = "torch"  # what runs the model: PyTorch (eager or compiled) or onnxruntime

    def __init__(self, spec: ModelSpec, mode: str, compiled: bool, cfg: BenchConfig,
                 device: torch.device, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.spec, self.mode, self.compiled = spec, mode, compiled
        self.device, self.amp = device, cfg.amp
        self.images, self.labels = images, labels
        torch.manual_seed(cfg.seed)
        self.module = build_model(spec).to(device)
        self.params_m = sum(p.numel() for p in self.module.parameters()) / 1e6
        self.module.train(mode == "train")
        self.model: nn.Module = self.module
        if compiled:
            from clusterformer.engine.compiled import compile_model

            self.model = compile_model(self.module, inference=mode == "infer")
        self.optimizer = (
            torch.optim.AdamW(self.module.parameters(), lr=1e-4, weight_decay=0.05,
                              fused=fused_supported(self.module.parameters()) or None)
            if mode == "train" else None
        )
        self.times: list[float] = []
        self.first_call_s = math.nan
        self.peak_cuda_bytes = 0

    @property
    def label(self) -> str:
        return self.spec.label + (" (compiled)" if self.compiled else "")

    def call(self) -> None:
        if self.optimizer is None:
            with torch.no_grad(), _autocast(self.amp, self.device):
                self.model(self.images)
            return
        with _autocast(self.amp, self.device):
            logits = self.model(self.images)
        F.cross_entropy(logits.float(), self.labels).backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def timed_call(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        _sync(self.device)
        start = time.perf_counter()
        self.call()
        _sync(self.device)
        elapsed = time.perf_counter() - start
        if self.device.type == "cuda":
            self.peak_cuda_bytes = max(self.peak_cuda_bytes,
                                       torch.cuda.max_memory_allocated(self.device))
        return elapsed

    def row(self, cfg: BenchConfig, threads: int, gflops: float,
            reference: Runner) -> dict[str, Any]:  # fmt: skip
        """This runner's result row (after its timed rounds at ``threads`` threads)."""
        median_s = statistics.median(self.times)
        cuda = self.device.type == "cuda"
        return {
            "model": self.spec.label, "compiled": self.compiled, "runtime": self.runtime,
            "mode": self.mode,
            "threads": threads, "amp": cfg.amp, "device": str(self.device),
            "batch_size": cfg.batch_size, "image_size": cfg.image_size,
            "params_m": round(self.params_m, 2), "gflops": round(gflops, 2),
            "img_per_s": cfg.batch_size / median_s, "ms_median": median_s * 1e3,
            "ms_min": min(self.times) * 1e3, "ms_max": max(self.times) * 1e3,
            "round_ms": [t * 1e3 for t in self.times],
            "rounds": cfg.rounds, "baseline": reference.spec.label,
            "speed_vs_baseline": _median_ratio(self.times, reference.times),
            "warmup_s": self.first_call_s,
            "peak_mem_mib": self.peak_cuda_bytes / 2**20 if cuda else None,
        }  # fmt: skip


def rotations(items: list[Any]) -> Iterator[list[Any]]:
    """Each round's order: the list rotated by the round number (every model goes first
    equally often, and none always follows the same one)."""
    round_index = 0
    while True:
        shift = round_index % len(items)
        yield items[shift:] + items[:shift]
        round_index += 1


def _median_ratio(times: list[float], baseline: list[float]) -> float:
    """Median over rounds of ``speed / baseline speed`` (= baseline time / time)."""
    return statistics.median(b / t for t, b in zip(times, baseline, strict=True))


def _time_mode(runners: list[Runner], cfg: BenchConfig, note: Callable[[str], None],
               where: str) -> None:  # fmt: skip
    """Warm every runner up, then time ``cfg.rounds`` interleaved rounds of them."""
    for runner in runners:
        note(f"{where}: warming up {runner.label}")
        start = time.perf_counter()
        for _ in range(cfg.warmup):
            runner.call()
        _sync(runner.device)
        runner.first_call_s = time.perf_counter() - start
    order = rotations(runners)
    for round_index in range(cfg.rounds):
        note(f"{where}: round {round_index + 1}/{cfg.rounds}")
        for runner in next(order):
            runner.times.append(runner.timed_call())


def measure(
    specs: list[ModelSpec],
    cfg: BenchConfig,
    *,
    baseline: str | None = None,
    progress: Callable[[str], None] | None = None,
    onnx: OnnxExports | None = None,
) -> list[dict[str, Any]]:
    """Time every model of ``specs`` in every mode of ``cfg``; one row per (threads, mode,
    model, eager/compiled/onnxruntime). ``baseline`` (a label of ``specs``, eager) is what the
    ratio column compares with; default the first model. ``onnx``: also time every model's
    exported graph in ONNX Runtime, in the inference rounds."""
    device = torch.device(cfg.device)
    note = progress or (lambda _text: None)
    labels = [s.label for s in specs]
    base = baseline or labels[0]
    if base not in labels:
        raise ValueError(f"--baseline {base} is not one of the models: {', '.join(labels)}")
    gflops = {s.label: count_gflops(s, cfg.image_size) for s in specs}
    generator = torch.Generator().manual_seed(cfg.seed)
    images = torch.randn(cfg.batch_size, 3, cfg.image_size, cfg.image_size,
                         generator=generator).to(device)
    targets = torch.randint(0, NUM_CLASSES, (cfg.batch_size,), generator=generator).to(device)
    rows: list[dict[str, Any]] = []
    for threads in cfg.threads or (torch.get_num_threads(),):
        torch.set_num_threads(threads)
        for mode in cfg.modes:
            runners = [
                Runner(spec, mode, compiled, cfg, device, images, targets)
                for spec in specs for compiled in ((False, True) if cfg.compile else (False,))
            ]
            if onnx is not None and mode == "infer":
                runners += [onnx.runner(spec, threads, images, note) for spec in specs]
            _time_mode(runners, cfg, note, f"{mode}, {threads} thread(s)")
            reference = next(r for r in runners if r.spec.label == base and not r.compiled
                             and r.runtime == "torch")
            rows += [r.row(cfg, threads, gflops[r.spec.label], reference) for r in runners]
            del runners
    if cfg.memory and device.type == "cpu":
        for row in rows:
            if not row["compiled"] and row["runtime"] == "torch":
                note(f"memory: {row['model']} ({row['mode']})")
                row.update(_memory_in_own_process(row["model"], row["mode"], cfg))
    return rows


def _memory_in_own_process(label: str, mode: str, cfg: BenchConfig) -> dict[str, float]:
    """Peak resident memory of a fresh process running one call of one model."""
    request = {"model": label, "mode": mode, "batch_size": cfg.batch_size,
               "image_size": cfg.image_size, "amp": cfg.amp, "seed": cfg.seed}
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "clusterformer.bench.memory_probe", json.dumps(request)],
        capture_output=True, text=True, env=env, check=False,
    )
    if done.returncode != 0:
        tail = " ".join(done.stderr.split())[-200:]
        raise RuntimeError(f"memory measurement of {label} ({mode}) failed: {tail}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def machine_info(device: str) -> dict[str, Any]:
    """What the numbers were measured on."""
    info: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu": _cpu_name(),
        "cores": os.cpu_count(),
        "load_average": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }
    if timm_available():
        import timm

        info["timm"] = timm.__version__
    if torch.device(device).type == "cuda" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def report(rows: list[dict[str, Any]], cfg: BenchConfig) -> dict[str, Any]:
    """The JSON document ``cf benchmark`` writes."""
    return {"machine": machine_info(cfg.device), "settings": asdict(cfg), "rows": rows}
