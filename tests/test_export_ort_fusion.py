"""The ONNX graph ``cf export`` writes takes ONNX Runtime's fused kernels: ``ops.linear``'s GELU
becomes one ``BiasGelu``/``Gelu`` node after ORT's graph optimisation, not five passes (``Div``,
``Erf``, ``Add``, ``Mul``, ``Mul``) over the MLP's largest tensor as the dynamo exporter's own
decomposition of ``aten.gelu`` left it. Fails on the code before ``_exported_gelu``: the
optimised graph kept its ``Erf`` nodes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from clusterformer.export import missing_onnx_packages, module_to_onnx
from clusterformer.ops import linear

pytestmark = pytest.mark.skipif(bool(missing_onnx_packages()),
                                reason="needs the export extra (onnx, onnxruntime, onnxscript)")


class Mlp(nn.Module):
    """The backbone's MLP on a ``(B, H, W, C)`` map."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(16, 64), nn.Linear(64, 16)

    def forward(self, images: Tensor) -> Tensor:
        x = images.permute(0, 2, 3, 1)
        hidden = linear(x, self.fc1.weight, self.fc1.bias, activation="gelu")
        return linear(hidden, self.fc2.weight, self.fc2.bias)


def test_exported_gelu_is_fused_by_onnxruntime(tmp_path):
    import onnx
    import onnxruntime as ort

    torch.manual_seed(0)
    model = Mlp().eval()
    example = torch.randn(2, 16, 32, 32)
    path, optimised = tmp_path / "mlp.onnx", tmp_path / "mlp.ort.onnx"
    kind, _ = module_to_onnx(model, example, path, output_names=("out",), static_size=32)
    assert kind == "dynamo"
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(optimised)
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    ops = [node.op_type for node in onnx.load(str(optimised)).graph.node]
    assert "Erf" not in ops and any(op in ("BiasGelu", "Gelu", "FastGelu") for op in ops), ops
    # The same numbers as F.gelu (exact erf form) in eager.
    images = torch.randn(3, 16, 32, 32)
    (got,) = session.run(None, {"images": images.numpy()})
    x = images.permute(0, 2, 3, 1)
    want = F.linear(F.gelu(F.linear(x, model.fc1.weight, model.fc1.bias)), model.fc2.weight,
                    model.fc2.bias)
    assert (torch.from_numpy(got) - want).abs().max() <= 1e-5 * want.abs().max()
