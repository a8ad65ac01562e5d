"""ONNX Runtime rows of ``cf benchmark --runtime onnxruntime``.

Each model is exported once, as ``cf export --image-size S`` writes a checkpoint's graph
(:func:`clusterformer.export.module_to_onnx`: ``torch.export`` and the dynamo exporter, opset
18; a static ``S x S`` input, the batch dynamic; timm's Swin-T takes only its own size), from
a model built with the seed and so the weights of its eager runner. For every thread count it
gets a session of its own on ONNX Runtime's CPU provider: ``intra_op_num_threads`` the row's
thread count, one inter-op thread, ONNX Runtime's default (full) graph optimisation. The
session's runner is timed in the same interleaved rounds as the eager ones, so its ratio to the
baseline is a per-round ratio like theirs. Each row carries ``onnx_max_rel_diff``, the largest
``|onnxruntime - eager| / max |eager|`` of the logits on the benchmark batch: a speed is only
worth comparing for a graph that computes the model (``cf export`` requires 1e-4).

ONNX Runtime, ONNX and onnxscript are the optional ``export`` extra; ``cf benchmark`` prints a
note and times the rest when they are missing.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from clusterformer.bench.models import ModelSpec, build_model
from clusterformer.bench.runner import BenchConfig, Runner
from clusterformer.engine.compiled import max_relative_difference

RUNTIME = "onnxruntime"
OUTPUT_NAMES = ("logits",)


class OrtRunner(Runner):
    """One exported model in one ONNX Runtime session: ``call()`` runs the benchmark batch."""

    runtime = RUNTIME

    def __init__(self, spec: ModelSpec, path: Path, threads: int, images: torch.Tensor,
                 params_m: float, max_rel_diff: float) -> None:  # fmt: skip
        import onnxruntime as ort

        self.spec, self.mode, self.compiled = spec, "infer", False
        self.device, self.amp = torch.device("cpu"), "none"
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(path), options,
                                            providers=["CPUExecutionProvider"])
        self.feed = {self.session.get_inputs()[0].name: images.numpy()}
        self.params_m, self.max_rel_diff = params_m, max_rel_diff
        self.times: list[float] = []
        self.first_call_s = float("nan")
        self.peak_cuda_bytes = 0

    @property
    def label(self) -> str:
        return f"{self.spec.label} (onnxruntime)"

    def call(self) -> None:
        self.session.run(None, self.feed)

    def row(self, cfg: BenchConfig, threads: int, gflops: float,
            reference: Runner) -> dict[str, Any]:  # fmt: skip
        return {**super().row(cfg, threads, gflops, reference),
                "onnx_max_rel_diff": self.max_rel_diff}


class OnnxExports:
    """The exported file of every model, made on first use in a temporary folder that
    :meth:`close` removes; :meth:`runner` opens a session on it. Handed to
    :func:`clusterformer.bench.measure` (``onnx=``), which adds a runner per model to its
    inference rounds."""

    def __init__(self, cfg: BenchConfig) -> None:
        self.cfg = cfg
        self._folder = tempfile.TemporaryDirectory(prefix="cf-benchmark-onnx-")
        self._files: dict[str, tuple[Path, float, float]] = {}

    def close(self) -> None:
        self._folder.cleanup()

    def __enter__(self) -> OnnxExports:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def runner(self, spec: ModelSpec, threads: int, images: torch.Tensor,
               note: Callable[[str], None]) -> OrtRunner:  # fmt: skip
        if spec.label not in self._files:
            note(f"exporting {spec.label} to ONNX")
            self._files[spec.label] = self._export(spec, images)
        path, params_m, max_rel_diff = self._files[spec.label]
        return OrtRunner(spec, path, threads, images, params_m, max_rel_diff)

    def _export(self, spec: ModelSpec, images: torch.Tensor) -> tuple[Path, float, float]:
        """Export ``spec``'s model; its file, parameters (millions) and logits' difference."""
        import onnxruntime as ort

        from clusterformer.export import module_to_onnx

        torch.manual_seed(self.cfg.seed)  # as Runner: the eager runner's weights
        model = build_model(spec).eval()
        path = Path(self._folder.name) / f"model-{len(self._files)}.onnx"
        size = self.cfg.image_size
        # Batch 2: a batch of 1 would let the exporter specialise the batch dimension.
        example = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
        module_to_onnx(model, example, path, output_names=OUTPUT_NAMES, static_size=size)
        with torch.no_grad():
            want = model(images)
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        (got,) = session.run(None, {session.get_inputs()[0].name: images.numpy()})
        diff, _ = max_relative_difference(torch.from_numpy(got), want)
        params_m = sum(p.numel() for p in model.parameters()) / 1e6
        return path, params_m, diff
