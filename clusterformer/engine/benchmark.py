"""``cf benchmark``: inference and training-step speed of models side by side, in one process.

Every model runs in the same process, on the same input, with the same thread count. The
timed calls are interleaved: each round times one call of every model (a batch's forward, or
a whole AdamW training step), in an order that rotates from round to round. A slow phase
of the machine (another job, a noisy neighbour) then falls on every model of that round alike.
Speeds are medians over rounds; ratios are medians of the per-round ratios against a baseline
model, so they survive drifts that move every model.

Models are named as on the command line: a preset (``clusterformer-tiny``), a preset with
constructor overrides (``clusterformer-tiny:num_iters=1``; ``grad_checkpointing=true`` turns on
activation checkpointing), or a timm model
(``timm/swin_tiny_patch4_window7_224``, needs the optional ``timm`` package: the
``clusterformer[bench]`` extra). All are 1000-class classifiers fed a ``(B, 3, S, S)`` batch
without a pixel mask; the training step is cross-entropy on fixed labels, ``backward`` and one
AdamW step (lr 1e-4, weight decay 0.05, torch's default foreach implementation).

Peak memory. On CUDA, ``torch.cuda.max_memory_allocated`` over a model's timed calls. On CPU
each eager model is run once more in a fresh process of its own, and the row reports that
process's peak resident memory (``VmHWM``) and how far it rose during the call: torch keeps no
CPU allocation statistics, and one process running several models cannot tell whose memory
is whose.
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
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

PEERS: tuple[str, ...] = (
    "timm/swin_tiny_patch4_window7_224",
    "timm/convnext_tiny",
    "timm/resnet50",
)
MODES: tuple[str, ...] = ("infer", "train")
NUM_CLASSES = 1000


@dataclass(frozen=True)
class ModelSpec:
    """One model to time: ``source`` is ``"clusterformer"`` or ``"timm"``."""

    label: str
    source: str
    name: str
    overrides: dict[str, Any] = field(default_factory=dict)


def parse_model(spec: str) -> ModelSpec:
    """``clusterformer-tiny``, ``clusterformer-tiny:num_iters=1,head_pool=concat`` or
    ``timm/<name>`` -> :class:`ModelSpec`.

    Raises:
        ValueError: an unknown preset or a malformed override.
    """
    if spec.startswith("timm/"):
        return ModelSpec(spec, "timm", spec[len("timm/"):])
    from clusterformer.models import list_models

    name, _, options = spec.partition(":")
    if name not in list_models():
        raise ValueError(
            f"unknown model '{name}'; expected a preset ({', '.join(list_models())}) "
            "or timm/<name>"
        )
    overrides: dict[str, Any] = {}
    for item in filter(None, options.split(",")):
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"'{spec}': overrides are key=value pairs separated by commas")
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value
    return ModelSpec(spec, "clusterformer", name, overrides)


def build_model(spec: ModelSpec) -> nn.Module:
    """A fresh 1000-class classifier for ``spec`` (random weights; nothing is downloaded)."""
    if spec.source == "timm":
        try:
            import timm
        except ImportError as exc:
            raise ValueError(
                f"{spec.label} needs timm: pip install 'clusterformer[bench]'"
            ) from exc
        return timm.create_model(spec.name, pretrained=False, num_classes=NUM_CLASSES)
    from clusterformer.models import create_model

    options = dict(spec.overrides)
    checkpointing = bool(options.pop("grad_checkpointing", False))
    model = create_model(spec.name, num_classes=NUM_CLASSES, **options)
    if checkpointing:
        model.set_grad_checkpointing(True)
    return model


def timm_available() -> bool:
    try:
        import timm  # noqa: F401
    except ImportError:
        return False
    return True


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


class _Runner:
    """One model in one mode (eager or compiled): ``call()`` runs one timed unit."""

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
            torch.optim.AdamW(self.module.parameters(), lr=1e-4, weight_decay=0.05)
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


def count_gflops(spec: ModelSpec, image_size: int) -> float:
    """Forward GFLOPs of one image (matmul and conv FLOPs, 2 per multiply-add)."""
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    model = build_model(spec).eval()
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(torch.randn(1, 3, image_size, image_size))
    return counter.get_total_flops() / 1e9


def _rotations(items: list[Any]) -> Iterator[list[Any]]:
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


def measure(
    specs: list[ModelSpec],
    cfg: BenchConfig,
    *,
    baseline: str | None = None,
    progress: Callable[[str], None] | None = None,
) -> list[dict[str, Any]]:
    """Time every model of ``specs`` in every mode of ``cfg``; one row per (threads, mode,
    model, eager/compiled). ``baseline`` (a label of ``specs``, eager) is what the ratio
    column compares with; default the first model."""
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
                _Runner(spec, mode, compiled, cfg, device, images, targets)
                for spec in specs for compiled in ((False, True) if cfg.compile else (False,))
            ]
            for runner in runners:
                note(f"{mode}, {threads} thread(s): warming up {runner.label}")
                start = time.perf_counter()
                for _ in range(cfg.warmup):
                    runner.call()
                _sync(device)
                runner.first_call_s = time.perf_counter() - start
            order = _rotations(runners)
            for round_index in range(cfg.rounds):
                note(f"{mode}, {threads} thread(s): round {round_index + 1}/{cfg.rounds}")
                for runner in next(order):
                    runner.times.append(runner.timed_call())
            reference = next(r for r in runners if r.spec.label == base and not r.compiled)
            for runner in runners:
                median_s = statistics.median(runner.times)
                rows.append({
                    "model": runner.spec.label,
                    "compiled": runner.compiled,
                    "mode": mode,
                    "threads": threads,
                    "amp": cfg.amp,
                    "device": str(device),
                    "batch_size": cfg.batch_size,
                    "image_size": cfg.image_size,
                    "params_m": round(runner.params_m, 2),
                    "gflops": round(gflops[runner.spec.label], 2),
                    "img_per_s": cfg.batch_size / median_s,
                    "ms_median": median_s * 1e3,
                    "ms_min": min(runner.times) * 1e3,
                    "ms_max": max(runner.times) * 1e3,
                    "rounds": cfg.rounds,
                    "baseline": base,
                    "speed_vs_baseline": _median_ratio(runner.times, reference.times),
                    "warmup_s": runner.first_call_s,
                    "peak_mem_mib": (runner.peak_cuda_bytes / 2**20
                                     if device.type == "cuda" else None),
                })
            del runners
    if cfg.memory and device.type == "cpu":
        for row in rows:
            if not row["compiled"]:
                note(f"memory: {row['model']} ({row['mode']})")
                row.update(_memory_in_own_process(row["model"], row["mode"], cfg))
    return rows


def _memory_in_own_process(label: str, mode: str, cfg: BenchConfig) -> dict[str, float]:
    """Peak resident memory of a fresh process running one call of one model."""
    request = {"model": label, "mode": mode, "batch_size": cfg.batch_size,
               "image_size": cfg.image_size, "amp": cfg.amp, "seed": cfg.seed}
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "clusterformer.engine.benchmark", json.dumps(request)],
        capture_output=True, text=True, env=env, check=False,
    )
    if done.returncode != 0:
        tail = " ".join(done.stderr.split())[-200:]
        raise RuntimeError(f"memory measurement of {label} ({mode}) failed: {tail}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {key}")


def _memory_child(request: dict[str, Any]) -> dict[str, float]:
    """Run in a fresh process: build the model, run one warm-up call, reset the high-water
    mark, run one measured call; peak resident memory and its rise during that call."""
    from clusterformer.engine.runtime import tune_cpu_allocator

    tune_cpu_allocator()  # the setting cf itself runs with
    cfg = BenchConfig(batch_size=request["batch_size"], image_size=request["image_size"],
                      amp=request["amp"], seed=request["seed"])
    generator = torch.Generator().manual_seed(cfg.seed)
    images = torch.randn(cfg.batch_size, 3, cfg.image_size, cfg.image_size, generator=generator)
    targets = torch.randint(0, NUM_CLASSES, (cfg.batch_size,), generator=generator)
    runner = _Runner(parse_model(request["model"]), request["mode"], False, cfg,
                     torch.device("cpu"), images, targets)
    runner.call()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak resident size (VmHWM) to the current one
    before = _status_kib("VmRSS")
    runner.call()
    peak = _status_kib("VmHWM")
    return {"peak_rss_mib": peak / 1024, "call_rise_mib": (peak - before) / 1024}


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


if __name__ == "__main__":  # the memory probe's child process
    print(json.dumps(_memory_child(json.loads(sys.argv[1]))))
