"""The training loop itself: :class:`Trainer` steps through the data and calls its hooks.

The loop calls every hook's ``before_train`` in order, ``after_step`` in order after each
optimizer step, and ``after_train`` in reverse order at the end (as nested context managers
exit: the last registered finishes first, so the final checkpoint is committed before the final
evaluation). A hook (:class:`HookBase`, detectron2's idea) reads and changes the trainer's
fields; what the hooks of a run are is :mod:`clusterformer.engine.hooks`. A hook with state to
keep across ``--resume`` returns it from ``state_dict`` (checkpoints save it with the rest of
:class:`~clusterformer.engine.train_state.TrainState`) and takes it back in ``load_state_dict``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from clusterformer.engine import checkpoint as ckpt
from clusterformer.engine.checkpoint import TrainState
from clusterformer.engine.distributed import DistEnv
from clusterformer.engine.divergence import TrainingDiverged
from clusterformer.engine.logging import RunLogger
from clusterformer.engine.signals import StopFlag
from clusterformer.engine.step import train_step
from clusterformer.tasks import Task


class HookBase:
    """A no-op at every point, with no state; subclasses override what they need."""

    def before_train(self, trainer: Trainer) -> None:
        pass

    def after_step(self, trainer: Trainer) -> None:
        pass

    def after_train(self, trainer: Trainer) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps of this hook (tensors and primitives); {} for nothing."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Take back what :meth:`state_dict` returned when the resumed checkpoint was saved."""


class Throughput:
    """Images per second since the last reading (evaluation time excluded)."""

    def __init__(self) -> None:
        self.images, self.since = 0, time.perf_counter()

    def add(self, images: int) -> None:
        self.images += images

    def restart(self) -> None:
        self.since = time.perf_counter()

    def images_per_second(self) -> float:
        now = time.perf_counter()
        rate = self.images / max(now - self.since, 1e-9)
        self.images, self.since = 0, now
        return rate


@dataclass
class Saved:
    """The last checkpoint known good: where it is and its step."""

    path: Path | None = None
    step: int = -1


def diverged_message(run_dir: Path, problem: str, saved: Saved) -> str:
    if saved.path is None:
        keep = "no checkpoint saved"
    else:
        where = saved.path.parent if saved.path.name == ckpt.WEIGHTS else saved.path
        shown = where.relative_to(run_dir) if where.is_relative_to(run_dir) else where
        keep = f"kept the last good checkpoint {shown}"
    return f"{run_dir}: training stopped: {problem}; {keep}; lower --lr or set --grad-clip"


@dataclass
class Trainer:
    """One run's moving parts; :meth:`run` is the loop. Hooks read and change its fields."""

    task: Task
    state: TrainState
    env: DistEnv
    loader: Any
    run_dir: Path
    total_steps: int
    accum_steps: int
    log: RunLogger
    stop: StopFlag
    saved: Saved
    hooks: list[HookBase] = field(default_factory=list)
    scalars: dict[str, float] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    last_batch: dict | None = None
    meter: Throughput = field(default_factory=Throughput)
    stop_early: bool = False  # set by a hook (early stopping): the loop ends after this step

    def step(self, group: list[dict]) -> None:
        """One optimizer step over the micro-batches of ``group``."""
        try:
            self.scalars = train_step(self.state, self.task, group)
        except FloatingPointError as exc:
            problem = str(exc).split(";")[0]
            raise TrainingDiverged(diverged_message(self.run_dir, problem, self.saved)) from None
        self.last_batch = group[-1]
        self.meter.add(sum(b["images"].shape[0] for b in group) * self.env.world_size)

    def run(self) -> None:
        state = self.state
        for hook in self.hooks:
            hook.before_train(self)
        self.meter.restart()
        while state.step < self.total_steps and not self.stop_early:
            self.loader.set_epoch(state.epoch)
            group: list[dict] = []
            for index, batch in enumerate(self.loader):
                if index < state.batches_in_epoch:
                    continue  # resume mid-epoch: skip what the saved run consumed
                group.append(batch)
                if len(group) < self.accum_steps:
                    continue
                self.step(group)
                state.batches_in_epoch = index + 1
                group = []
                for hook in self.hooks:
                    hook.after_step(self)
                if state.step >= self.total_steps or self.stop_early:
                    break
            else:
                state.epoch += 1
                state.batches_in_epoch = 0
        for hook in reversed(self.hooks):
            hook.after_train(self)
