"""What changes while training, and what of it a checkpoint keeps: :class:`TrainState`.

A checkpoint holds the weights in ``model.safetensors`` (the EMA weights when EMA is on) and
the rest of :meth:`TrainState.state_dict` in ``state.pt``::

    step, epoch, batches_in_epoch   where training and the loader are (the loader position)
    world_size                      the number of processes that wrote it
    optimizer, scaler               their state_dicts (scaler None without fp16)
    model                           the training weights, only when EMA is on
    rng                             every rank's RNG states (:mod:`clusterformer.engine.rng`)
    hooks                           each hook's ``state_dict`` by hook name (e.g. the best
                                    metric and the patience counter of the evaluation hook)

Everything in it is tensors and primitive containers, so ``torch.load(weights_only=True)``
reads it back; loading never runs code.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from clusterformer.engine.checkpoint_load import load_weights
from clusterformer.engine.optim import Schedule
from clusterformer.engine.rng import set_rng_state


class Stateful(Protocol):
    """A hook with state worth keeping across ``--resume`` (detectron2's hook convention)."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class ModelEma:
    """Exponential moving average of a module's floating-point weights and buffers."""

    def __init__(self, module: nn.Module, decay: float) -> None:
        self.decay = decay
        self.module = copy.deepcopy(module).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        current = module.state_dict()
        for name, ema_value in self.module.state_dict().items():
            value = current[name].detach()
            if ema_value.dtype.is_floating_point:
                ema_value.lerp_(value.to(ema_value.dtype), 1.0 - self.decay)
            else:
                ema_value.copy_(value)


def named_hooks(hooks: Sequence[Stateful]) -> list[tuple[str, Stateful]]:
    """Each hook with its key in ``state.pt``: its class name, ``#2``, ``#3`` ... for repeats."""
    named, seen = [], {}
    for hook in hooks:
        name = type(hook).__qualname__
        seen[name] = seen.get(name, 0) + 1
        named.append((name if seen[name] == 1 else f"{name}#{seen[name]}", hook))
    return named


@dataclass
class TrainState:
    """What changes while training. ``model`` is what forward runs on (possibly DDP- or
    compile-wrapped); ``module`` is the plain model whose weights are saved."""

    model: nn.Module
    module: nn.Module
    optimizer: torch.optim.Optimizer
    schedule: Schedule
    device: torch.device
    amp: str = "none"
    grad_clip: float | None = None
    scaler: torch.amp.GradScaler | None = None
    ema: ModelEma | None = None
    step: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0

    @property
    def saved_weights(self) -> nn.Module:
        """The module whose weights ``model.safetensors`` holds: the EMA one when EMA is on."""
        return self.ema.module if self.ema is not None else self.module

    def state_dict(self, *, rngs: list[dict[str, Any]], world_size: int,
                   hooks: Sequence[Stateful] = ()) -> dict[str, Any]:  # fmt: skip
        """What ``state.pt`` holds (see the module docstring); ``rngs``: every rank's
        :func:`~clusterformer.engine.rng.rng_state`, in rank order."""
        out: dict[str, Any] = {
            "step": self.step, "epoch": self.epoch, "batches_in_epoch": self.batches_in_epoch,
            "world_size": world_size, "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "rng": rngs,
        }  # fmt: skip
        if self.ema is not None:  # the safetensors file then holds the EMA weights
            out["model"] = self.module.state_dict()
        states = {name: hook.state_dict() for name, hook in named_hooks(hooks)}
        out["hooks"] = {name: state for name, state in states.items() if state}
        return out

    def load_state_dict(self, saved: dict[str, Any], weights: Path, *, rank: int,
                        hooks: Sequence[Stateful] = ()) -> None:  # fmt: skip
        """Continue from a checkpoint: ``weights`` (its ``model.safetensors``) and ``saved``
        (its ``state.pt``). This command's peak lr and weight decay win over the saved ones
        (the loop notes and records what changed); the RNG is this rank's saved one.

        Raises:
            ValueError: the checkpoint was saved without EMA and this run has EMA.
            CheckpointError: weights that do not fit the model.
        """
        load_weights(self.saved_weights, weights)
        if self.ema is not None:
            if "model" not in saved:
                raise ValueError(f"{weights}: saved without EMA; resume it without EMA")
            self.module.load_state_dict(saved["model"])
        # The saved groups carry the implementation they were made with (fused, foreach):
        # this run's choice wins, as its lr and weight decay do.
        keys = ("initial_lr", "weight_decay", "fused", "foreach")
        settings = [{k: g.get(k) for k in keys} for g in self.optimizer.param_groups]
        self.optimizer.load_state_dict(saved["optimizer"])
        for group, kept in zip(self.optimizer.param_groups, settings, strict=True):
            group.update(kept)
            group["lr"] = kept["initial_lr"]
        if self.scaler is not None and saved.get("scaler"):
            self.scaler.load_state_dict(saved["scaler"])
        self.step, self.epoch = int(saved["step"]), int(saved["epoch"])
        self.batches_in_epoch = int(saved["batches_in_epoch"])
        hook_states = saved.get("hooks") or {}
        for name, hook in named_hooks(hooks):
            if name in hook_states:
                hook.load_state_dict(hook_states[name])
        rngs = saved.get("rng") or []
        if rank < len(rngs):
            set_rng_state(rngs[rank])
