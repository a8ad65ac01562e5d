"""Helpers shared by the model tests and the legacy-checkpoint fixture script."""

from __future__ import annotations

import torch


def perturb(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Move every parameter off its initialisation, in place, and return the module: zero
    biases would skip the bias terms and layer scales of 1e-5 would hide the mixer from a
    block's output."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if name.rsplit(".", 1)[-1] in ("ls1", "ls2"):
                param.copy_(0.5 + 0.2 * noise)
            else:
                param.add_(0.1 * noise)
    return module


def rel_diff(got: torch.Tensor, want: torch.Tensor) -> float:
    """``max |got - want| / max |want|``."""
    return ((got - want).abs().max() / want.abs().max().clamp_min(1e-12)).item()


def fit_fixed_batch(task, model: torch.nn.Module, batch: dict, steps: int,  # noqa: ANN001
                    lr: float = 3e-3) -> tuple[list[float], dict]:
    """``steps`` AdamW steps of ``task``'s loss on one batch: (the loss per step, the last
    step's scalars)."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    losses, scalars = [], {}
    for _ in range(steps):
        loss, scalars = task.loss(task.forward(model, batch), batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(scalars["loss"])
    return losses, scalars
