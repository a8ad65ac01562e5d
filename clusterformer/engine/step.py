"""One optimizer step, independent of data loading: the unit the distributed test drives.

``train_step`` runs forward/backward over a group of micro-batches (gradient accumulation),
clips, steps the optimizer (through a GradScaler for fp16) and advances the step counter.
Under DDP the gradients are all-reduced on the last micro-batch only. The EMA of the weights
(``TrainState.ema``) is the loop's :class:`~clusterformer.engine.hooks.EmaHook`; what a
checkpoint keeps of the state is :mod:`clusterformer.engine.train_state`.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from clusterformer.engine.checkpoint import TrainState
from clusterformer.engine.evaluate import autocast, to_device
from clusterformer.engine.finite import describe_output, non_finite_output
from clusterformer.engine.optim import set_lr
from clusterformer.tasks import Task


def make_scaler(amp: str, device: torch.device) -> torch.amp.GradScaler | None:
    """A GradScaler for fp16 on CUDA; None otherwise (bf16 and fp32 need none)."""
    if amp != "fp16":
        return None
    if device.type != "cuda":
        raise ValueError(
            "--amp fp16 needs a CUDA device (it trains with a gradient scaler); "
            "use --amp bf16 or --amp none on CPU"
        )
    return torch.amp.GradScaler("cuda")


def _find_ddp(model: nn.Module) -> DistributedDataParallel | None:
    inner = getattr(model, "_orig_mod", model)  # torch.compile wrapper
    return inner if isinstance(inner, DistributedDataParallel) else None


def train_step(
    state: TrainState,
    task: Task,
    micro_batches: Sequence[dict[str, Any]],
    *,
    generator: torch.Generator | None = None,
) -> dict[str, float]:
    """One optimizer step over ``micro_batches`` (each a loader batch; losses are averaged).

    Returns:
        logged scalars: the task's (averaged over micro-batches), ``lr``, ``grad_norm``.
    Raises:
        FloatingPointError: an output, the loss or the gradient norm is not finite (without
            fp16's scaler to skip the step); the weights are then still unchanged.
    """
    if not micro_batches:
        raise ValueError("train_step needs at least one micro-batch")
    lr = set_lr(state.optimizer, state.schedule, state.step)
    state.model.train()
    state.optimizer.zero_grad(set_to_none=True)
    ddp = _find_ddp(state.model)
    n = len(micro_batches)
    totals: dict[str, float] = {}
    for i, batch in enumerate(micro_batches):
        batch = task.augment(to_device(batch, state.device), generator)
        last = i == n - 1
        sync = contextlib.nullcontext() if ddp is None or last else ddp.no_sync()
        with sync:
            with autocast(state.amp, state.device):
                outputs = task.forward(state.model, batch)
            # Before the loss: matching (scipy) on NaN outputs fails with an unrelated message.
            bad = non_finite_output(outputs) if state.scaler is None else None
            if bad is not None:
                raise FloatingPointError(
                    f"model {describe_output(bad)} is NaN or infinite at step {state.step + 1}; "
                    "lower --lr or set --grad-clip"
                )
            loss, scalars = task.loss(outputs, batch)
            if not math.isfinite(float(loss.detach())) and state.scaler is None:
                raise FloatingPointError(
                    f"loss is {float(loss.detach())} at step {state.step + 1}; lower --lr, "
                    "set --grad-clip or use --amp none"
                )
            scaled = loss / n
            (state.scaler.scale(scaled) if state.scaler is not None else scaled).backward()
        for key, value in scalars.items():
            totals[key] = totals.get(key, 0.0) + value / n
    if state.scaler is not None:
        state.scaler.unscale_(state.optimizer)
    params = [p for g in state.optimizer.param_groups for p in g["params"] if p.grad is not None]
    max_norm = state.grad_clip if state.grad_clip else math.inf
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm) if params else torch.zeros(())
    if state.scaler is None and not math.isfinite(float(grad_norm)):  # the step would poison
        raise FloatingPointError(  # the weights: stop while they are still good
            f"gradient norm is {float(grad_norm)} at step {state.step + 1}; lower --lr or set "
            "--grad-clip"
        )
    if state.scaler is not None:
        state.scaler.step(state.optimizer)
        state.scaler.update()
    else:
        state.optimizer.step()
    state.step += 1
    return {**totals, "lr": lr, "grad_norm": float(grad_norm)}
