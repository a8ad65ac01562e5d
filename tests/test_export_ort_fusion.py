"""The ONNX graph ``cf export`` writes takes ONNX Runtime's fused kernels: ``ops.linear``'s GELU
becomes one ``BiasGelu``/``Gelu`` node after ORT's graph optimisation, not five passes (``Div``,
``Erf``, ``Add``, ``Mul``, ``Mul``) over the MLP's largest tensor as the dynamo exporter's own
decomposition of ``aten.gelu`` left it (fails on the code before ``_exported_gelu``: the
optimised graph kept its ``Erf`` nodes); the clustering's softmax is one ``Softmax`` node
(``export.onnx_graph``)."""

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


class ClusteringStep(nn.Module):
    """One clustering step on ``(B, 3, H, W)``: centers from the first 4 pixels."""

    def forward(self, images: Tensor) -> Tensor:
        from clusterformer.ops import cross_attention_clustering_step

        pixels = images.flatten(2).transpose(1, 2)
        return cross_attention_clustering_step(pixels[:, :4], pixels, pixels)


def test_exported_clustering_softmax_is_one_softmax_node(tmp_path):
    """The traced ``exp(log_softmax)`` of the assignment (``ops.clustering._assign``) is written
    as one ``Softmax``. Fails without ``export.onnx_graph``: the file held LogSoftmax and Exp."""
    import onnx
    import onnxruntime as ort

    path = tmp_path / "step.onnx"
    kind, _ = module_to_onnx(ClusteringStep(), torch.randn(2, 3, 8, 8), path,
                             output_names=("out",), static_size=8)
    assert kind == "dynamo"
    ops = [node.op_type for node in onnx.load(str(path)).graph.node]
    assert ops.count("Softmax") == 1 and "LogSoftmax" not in ops and "Exp" not in ops, ops
    images = torch.randn(3, 3, 8, 8)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {"images": images.numpy()})
    want = ClusteringStep()(images)
    assert (torch.from_numpy(got) - want).abs().max() <= 1e-5 * want.abs().max()


def _graph(outputs: list[str]):
    import onnx
    from onnx import TensorProto, helper

    value = lambda name: helper.make_tensor_value_info(name, TensorProto.FLOAT, [2, 5, 3])  # noqa: E731
    nodes = [helper.make_node("LogSoftmax", ["x"], ["logp"], axis=-2),
             helper.make_node("Exp", ["logp"], ["p"]),
             helper.make_node("Relu", ["x"], ["r"]),
             helper.make_node("Exp", ["r"], ["e"])]
    graph = helper.make_graph(nodes, "g", [value("x")], [value(name) for name in outputs])
    return onnx.helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


@pytest.mark.parametrize("outputs, replaced", [(["p", "e"], 1), (["p", "e", "logp"], 0)])
def test_softmax_rewrite_keeps_the_numbers_and_every_used_value(outputs, replaced):
    """Only an ``Exp`` of a ``LogSoftmax`` used nowhere else is rewritten (an ``Exp`` of
    anything else, or a log-probability the graph also returns, stays); the outputs do not change."""
    import onnx
    import onnxruntime as ort

    from clusterformer.export.onnx_graph import softmax_from_exp_log_softmax

    x = torch.randn(2, 5, 3).numpy()
    before = _graph(outputs)
    after = _graph(outputs)
    assert softmax_from_exp_log_softmax(after) == replaced
    onnx.checker.check_model(after, full_check=True)
    ops = [node.op_type for node in after.graph.node]
    assert ops.count("Softmax") == replaced and ops.count("Exp") == 2 - replaced
    if replaced:
        assert next(n for n in after.graph.node if n.op_type == "Softmax").attribute[0].i == -2
    run = lambda m: ort.InferenceSession(m.SerializeToString(),  # noqa: E731
                                         providers=["CPUExecutionProvider"]).run(None, {"x": x})
    for want, got in zip(run(before), run(after), strict=True):
        assert abs(want - got).max() <= 1e-6
