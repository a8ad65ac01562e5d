"""Rewrites of a written ONNX graph into forms ONNX Runtime has one kernel for; same numbers.

``Exp(LogSoftmax(x, axis))`` becomes ``Softmax(x, axis)``. While traced, ``ops.clustering``
writes its assignment softmax as ``exp(log_softmax)`` so that inductor's attention rewrite
cannot misread it (``ops.clustering._assign``). ``torch.export`` traces the same branch, so
the exported graph ran two passes (36 ``LogSoftmax`` and 36 ``Exp`` nodes in tiny, T = 3) where
ONNX Runtime has one ``Softmax`` kernel. The rewrite belongs here, on the ONNX file, and not in
the traced op: a ``.pt2`` program may still be compiled by inductor (AOTInductor), where the
plain softmax would be misread again.
"""

from __future__ import annotations

import collections
from pathlib import Path
from typing import Any


def softmax_from_exp_log_softmax(model: Any) -> int:
    """Replace every ``Exp(LogSoftmax(x))`` of ``model``'s main graph by ``Softmax(x)`` in place.

    A ``LogSoftmax`` whose output is used anywhere else (another node, a graph output) stays,
    and so does its ``Exp``. Both ops take the same ``axis`` attribute with the same meaning in
    every opset, so the ``Softmax`` node keeps the ``LogSoftmax`` node's attributes.

    Args:
        model: an ``onnx.ModelProto``.

    Returns:
        the number of pairs replaced.
    """
    import onnx

    graph = model.graph
    uses: collections.Counter[str] = collections.Counter(
        name for node in graph.node for name in node.input)
    uses.update(output.name for output in graph.output)
    producer = {name: node for node in graph.node for name in node.output}
    replaced, dropped = 0, set()
    nodes = []
    for node in graph.node:
        source = producer.get(node.input[0]) if node.op_type == "Exp" and not node.domain else None
        if (source is not None and source.op_type == "LogSoftmax" and not source.domain
                and uses[source.output[0]] == 1):
            softmax = onnx.helper.make_node("Softmax", [source.input[0]], list(node.output),
                                            name=f"{source.name}_softmax")
            softmax.attribute.extend(source.attribute)
            nodes.append(softmax)
            dropped.add(id(source))
            replaced += 1
        else:
            nodes.append(node)
    if replaced:
        # The Softmax sits where the Exp was: after its input's producer, before its consumers.
        kept = [_detached(node) for node in nodes if id(node) not in dropped]
        del graph.node[:]
        graph.node.extend(kept)
    return replaced


def _detached(node: Any) -> Any:
    """A copy of ``node`` that outlives the graph's node list being cleared."""
    copy = type(node)()
    copy.CopyFrom(node)
    return copy


def rewrite_onnx_file(path: str | Path) -> int:
    """Apply :func:`softmax_from_exp_log_softmax` to the ONNX file at ``path`` (rewritten only
    when something changed). Returns the number of nodes replaced."""
    import onnx

    model = onnx.load(str(path))
    replaced = softmax_from_exp_log_softmax(model)
    if replaced:
        onnx.save(model, str(path))
    return replaced
