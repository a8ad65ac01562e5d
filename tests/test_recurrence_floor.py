"""benchmarks/bench_recurrence_floor.py times exactly the products that T = 3 adds over T = 1."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_recurrence_floor as floor  # noqa: E402  (the benchmarks folder is not a package)

from clusterformer.models import create_model  # noqa: E402


def test_block_shapes_follow_tiny_at_224():
    shapes = floor.block_shapes(8, 224)
    # depths 2, 2, 6, 2; 8x8, 4x4, 2x2, 1x1 windows of 7x7 tokens; 32 channels per head
    assert shapes == ([(512, 96, 3)] * 2 + [(128, 192, 6)] * 2 + [(32, 384, 12)] * 6
                      + [(8, 768, 24)] * 2)


def _training_flops(num_iters: int, image: int) -> int:
    torch.manual_seed(0)
    model = create_model(floor.MODEL, num_classes=10, num_iters=num_iters)
    with FlopCounterMode(display=False) as counter:
        model(torch.randn(1, 3, image, image)).sum().backward()
    return counter.get_total_flops()


@pytest.mark.parametrize("image", [56, 50])  # whole windows at stages 1-2, and none whole
def test_extra_products_are_the_flops_two_more_iterations_add(image):
    parts = floor.extra_products(floor.block_shapes(1, image), iterations=2)
    timed = sum(flops for _, flops in parts.values())
    assert timed == _training_flops(3, image) - _training_flops(1, image)
    for run, _ in parts.values():
        run()  # every product runs at these shapes
