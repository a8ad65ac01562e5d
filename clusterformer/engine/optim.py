"""AdamW with parameter groups, and learning-rate schedules (warm-up then cosine or poly).

Schedules are pure functions of the optimizer step, so resuming needs only the step number.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

SCHEDULES: tuple[str, ...] = ("cosine", "poly", "constant")
_LAYER_SCALE = re.compile(r"(^|\.)ls\d*(\.|$)")  # "ls", "ls1", "blocks.0.ls2.gamma"; not "cls"


def _no_decay(name: str, param: torch.Tensor) -> bool:
    # Norm weights, biases and layer scales are 0-/1-d or named so; decaying them only
    # shrinks the model's freedom to rescale features.
    return param.ndim <= 1 or "layer_scale" in name or _LAYER_SCALE.search(name) is not None


def param_groups(
    model: nn.Module,
    *,
    lr: float,
    weight_decay: float,
    backbone_lr_mult: float = 1.0,
    skip_names: Iterable[str] = (),
) -> list[dict]:
    """Split trainable parameters into (decay | no decay) x (backbone | rest) groups.

    No weight decay on parameters with ``ndim <= 1`` (norms, biases) and on layer scales
    (names containing ``layer_scale`` or a ``ls`` leaf). When the model has a ``.backbone``
    attribute its parameters get ``lr * backbone_lr_mult``.

    Each group carries ``initial_lr`` (the peak lr the schedule scales) and ``name``.
    """
    skip = set(skip_names)
    backbone = getattr(model, "backbone", None)
    backbone_ids = (
        {id(p) for p in backbone.parameters()} if isinstance(backbone, nn.Module) else set()
    )
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad or name in skip:
            continue
        key = (id(param) in backbone_ids, _no_decay(name, param))
        groups.setdefault(key, []).append(param)
    out = []
    for (is_backbone, no_decay), params in sorted(groups.items()):
        group_lr = lr * (backbone_lr_mult if is_backbone else 1.0)
        out.append(
            {
                "params": params,
                "lr": group_lr,
                "initial_lr": group_lr,
                "weight_decay": 0.0 if no_decay else weight_decay,
                "name": f"{'backbone' if is_backbone else 'model'}/{'no_decay' if no_decay else 'decay'}",
            }
        )
    return out


def build_optimizer(
    model: nn.Module,
    *,
    lr: float,
    weight_decay: float = 0.05,
    betas: tuple[float, float] = (0.9, 0.999),
    backbone_lr_mult: float = 1.0,
) -> torch.optim.AdamW:
    """AdamW over :func:`param_groups`; torch's fused implementation where every parameter
    allows it (:func:`fused_supported`)."""
    groups = param_groups(
        model, lr=lr, weight_decay=weight_decay, backbone_lr_mult=backbone_lr_mult
    )
    fused = fused_supported(p for group in groups for p in group["params"]) or None
    return torch.optim.AdamW(groups, lr=lr, betas=betas, weight_decay=weight_decay, fused=fused)


_FUSED_DEVICES = ("cpu", "cuda")
_FUSED_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


def fused_supported(params: Iterable[Tensor]) -> bool:
    """Whether torch's fused AdamW takes these parameters: floating point, on the CPU or CUDA.

    Fused is one kernel over each parameter instead of a dozen element-wise passes: on the CPU
    at one thread a step over clusterformer-tiny's 31.5 M parameters took 20 ms against 69 ms
    for torch's default (docs/benchmarks.md, "Where the step time goes"). Same update up to
    float rounding. Where it does not apply (other devices, e.g. XLA or MPS before its support)
    torch's default implementation serves."""
    params = list(params)
    return bool(params) and all(
        p.device.type in _FUSED_DEVICES and p.dtype in _FUSED_DTYPES for p in params
    )


@dataclass(frozen=True)
class Schedule:
    """Learning-rate multiplier per optimizer step: linear warm-up, then decay to ``min_ratio``.

    ``factor(step)`` for step 0.. total_steps-1: warm-up ramps from ``1/(warmup+1)`` to 1
    (never 0, so the first step already learns), then cosine / poly(power) decay to
    ``min_ratio`` at ``total_steps``; ``constant`` stays at 1 after warm-up.
    """

    total_steps: int
    warmup_steps: int = 0
    kind: str = "cosine"
    min_ratio: float = 0.0
    power: float = 0.9

    def __post_init__(self) -> None:
        if self.kind not in SCHEDULES:
            raise ValueError(
                f"unknown lr schedule '{self.kind}'; choose one of {', '.join(SCHEDULES)}"
            )
        if self.total_steps < 1:
            raise ValueError(f"total steps must be >= 1, got {self.total_steps}")

    def factor(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / (self.warmup_steps + 1)
        if self.kind == "constant":
            return 1.0
        span = max(self.total_steps - self.warmup_steps, 1)
        progress = min(max((step - self.warmup_steps) / span, 0.0), 1.0)
        if self.kind == "cosine":
            decay = 0.5 * (1.0 + math.cos(math.pi * progress))
        else:
            decay = (1.0 - progress) ** self.power
        return self.min_ratio + (1.0 - self.min_ratio) * decay


def set_lr(optimizer: torch.optim.Optimizer, schedule: Schedule, step: int) -> float:
    """Set every group's lr to ``initial_lr * schedule.factor(step)``; returns the first group's."""
    factor = schedule.factor(step)
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"] * factor
    return optimizer.param_groups[0]["lr"]
