"""The Task interface: everything task-specific the generic training loop needs.

The engine (``clusterformer.engine``) only ever talks to a :class:`Task`: it builds the
model, computes the loss, turns raw outputs into predictions and scores them. A new task
is one subclass; the loop, checkpoints, logging and distributed code stay unchanged.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Protocol

import torch
from torch import Tensor, nn

Batch = dict[str, Any]


class Evaluator(Protocol):
    """Accumulates predictions batch by batch; ``compute`` reduces across ranks."""

    def update(self, predictions: Any, batch: Batch) -> None: ...

    def compute(self) -> dict[str, float]:
        """Metrics over everything seen on every rank (percent where the metric is a rate)."""
        ...


class Task(ABC):
    """Base class of the five tasks.

    Attributes:
        name: the task name used on the CLI and in checkpoints (e.g. ``"classification"``).
        primary_metric: the metric key printed first and used to describe a run.
    """

    name: str = ""
    primary_metric: str = ""

    @abstractmethod
    def build_model(self, preset: str, num_classes: int, **overrides: Any) -> nn.Module:
        """A fresh model of preset ``preset`` for ``num_classes`` classes."""

    def forward(self, model: nn.Module, batch: Batch) -> Any:
        """Run the model on a batch (``images`` (B, 3, H, W), ``pixel_mask`` (B, H, W)).

        A mask with no padded pixel is dropped: the model then takes its unmasked fast paths
        (the same numbers, tested). The check runs here, outside a compiled model, so a
        compiled model sees ``None`` too instead of breaking its graph on the data."""
        mask = batch.get("pixel_mask")
        if mask is not None and bool(mask.all()):
            mask = None
        return model(batch["images"], pixel_mask=mask)

    def augment(self, batch: Batch, generator: torch.Generator | None = None) -> Batch:
        """Train-time batch-level augmentation (mixup, ...); identity by default.

        Must not modify ``batch`` in place; returns a new dict.
        """
        return batch

    @abstractmethod
    def loss(self, outputs: Any, batch: Batch) -> tuple[Tensor, dict[str, float]]:
        """The scalar training loss and a dict of scalars to log (floats)."""

    @abstractmethod
    def postprocess(self, outputs: Any, batch: Batch) -> Any:
        """Raw model outputs -> predictions in the form the evaluator accepts."""

    @abstractmethod
    def evaluator(self, num_classes: int, categories: list[dict] | None = None) -> Evaluator:
        """A fresh evaluator for one pass over a dataset."""

    def config(self) -> dict[str, Any]:
        """JSON-able task settings (stored in config.json and checkpoint metadata)."""
        return {}
