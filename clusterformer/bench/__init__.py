"""``cf benchmark``'s runner: inference and training-step speed of models side by side.

A tool above the training engine (it builds presets and timm peers, compiles them with the
engine's settings and times them); used by ``cf benchmark`` and ``benchmarks/``, never by
training. :mod:`.models` names and builds the models, :mod:`.runner` times them,
:mod:`.memory_probe` is the child process that measures one model's peak CPU memory,
:mod:`.onnx_runtime` exports the models and times them in ONNX Runtime (``--runtime
onnxruntime``).
"""

from clusterformer.bench.models import PEERS, ModelSpec, build_model, parse_model, timm_available
from clusterformer.bench.runner import MODES, BenchConfig, machine_info, measure, report

__all__ = [
    "MODES",
    "PEERS",
    "BenchConfig",
    "ModelSpec",
    "build_model",
    "machine_info",
    "measure",
    "parse_model",
    "report",
    "timm_available",
]
