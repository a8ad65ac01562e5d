"""Stop a diverging run before it can replace a good checkpoint.

A NaN or infinite loss, model output or weight stops training with one line. Weights can also
blow up while staying finite (a far too high learning rate): the first sign is then NaN outputs
of the *next* forward pass, after a checkpoint of those weights could already have been saved.
So before each save the weights about to be saved are checked twice: every tensor is finite,
and a forward pass on the last training batch gives finite outputs. The check runs in eval
mode without gradients and leaves the RNG untouched, so training is the same with or without
saves.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from clusterformer.engine.evaluate import autocast, to_device
from clusterformer.engine.finite import describe_output, first_non_finite, non_finite_output

if TYPE_CHECKING:
    from clusterformer.engine.checkpoint import TrainState
    from clusterformer.tasks import Task


class TrainingDiverged(FloatingPointError):
    """Training stopped on a non-finite loss, output or weight; no checkpoint was replaced."""


@torch.no_grad()
def unsaveable(state: TrainState, task: Task, batch: dict | None) -> str | None:
    """Why the weights of ``state`` must not be saved (NaN/inf weights, or NaN/inf outputs
    on ``batch``), or None when they are fine."""
    saved = state.saved_weights
    bad = first_non_finite(saved.state_dict())
    if bad is None and state.ema is not None:
        bad = first_non_finite(state.module.state_dict())
    if bad is not None:
        return f"weight {bad} is NaN or infinite"
    if batch is None:
        return None
    devices = [state.device] if state.device.type == "cuda" else []
    was_training = saved.training
    with torch.random.fork_rng(devices=devices):
        saved.eval()
        try:
            # fp16 may overflow where the fp32 weights are fine (the scaler handles that)
            with autocast("none" if state.amp == "fp16" else state.amp, state.device):
                outputs = task.forward(saved, to_device(batch, state.device))
        finally:
            saved.train(was_training)
    bad = non_finite_output(outputs)
    if bad is None:
        return None
    return f"the weights give a NaN or infinite {describe_output(bad)} on the last batch"
