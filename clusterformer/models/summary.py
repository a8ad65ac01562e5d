"""Size and cost of a preset without allocating its weights (built on the ``meta`` device)."""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from clusterformer.models.registry import create_model, preset_config


def count_flops(model: torch.nn.Module, inputs: torch.Tensor) -> int:
    """FLOPs of ``model(inputs)`` as ``torch.utils.flop_counter`` counts them: matmuls and
    convolutions only, 2 FLOPs per multiply-add; normalisation, softmax etc. are not counted."""
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(inputs)
    return int(counter.get_total_flops())


def describe_model(name: str, *, image_size: int = 224, num_classes: int = 1000) -> dict[str, Any]:
    """Parameters and forward GFLOPs of preset ``name`` at ``image_size`` (batch 1).

    Returns:
        ``{"name", "params", "params_m", "depths", "dims", "mlp_ratios", "gflops",
        "image_size", "num_classes"}``; ``gflops`` counts matmul + conv only.
    """
    config = preset_config(name)
    with torch.device("meta"):
        model = create_model(name, num_classes=num_classes).eval()
        images = torch.empty(1, 3, image_size, image_size)
    params = sum(p.numel() for p in model.parameters())
    return {
        "name": name,
        "params": params,
        "params_m": round(params / 1e6, 3),
        "depths": list(config["depths"]),
        "dims": list(config["dims"]),
        "mlp_ratios": list(config["mlp_ratios"]),
        "gflops": round(count_flops(model, images) / 1e9, 3),
        "image_size": image_size,
        "num_classes": num_classes,
    }
