"""What the training loop does besides stepping, as hooks (:class:`~clusterformer.engine.
trainer.HookBase`; the order they are called in: :mod:`clusterformer.engine.trainer`).

* :class:`EmaHook` -- the exponential moving average of the weights.
* :class:`LoggingHook` -- training scalars every ``log_every`` steps (mean over ranks, images
  per second, epoch, peak GPU memory) to ``metrics.jsonl`` and the terminal.
* :class:`EvalHook` -- held-out metrics every ``eval_every`` steps and at the end; the best
  checkpoint and early stopping (:mod:`clusterformer.engine.best`), whose best value and
  patience counter are its ``state_dict`` (kept in checkpoints, so they survive ``--resume``).
* :class:`CheckpointHook` -- periodic and final checkpoints; on SIGTERM / SIGINT a checkpoint,
  then :class:`TrainingInterrupted`; never a checkpoint of weights that diverged.
"""

from __future__ import annotations

import signal
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from clusterformer.engine import checkpoint as ckpt
from clusterformer.engine.best import BestCheckpoint
from clusterformer.engine.distributed import any_rank, gather_objects, mean_across_ranks
from clusterformer.engine.divergence import TrainingDiverged, unsaveable
from clusterformer.engine.evaluate import evaluate
from clusterformer.engine.signals import TrainingInterrupted
from clusterformer.engine.trainer import HookBase, Saved, diverged_message
from clusterformer.metrics.topk import trivial_top_k

if TYPE_CHECKING:
    from clusterformer.engine.trainer import Trainer


class EmaHook(HookBase):
    """``ema = decay * ema + (1 - decay) * weights`` after every step."""

    def after_step(self, trainer: Trainer) -> None:
        state = trainer.state
        if state.ema is not None:
            state.ema.update(state.module)


class LoggingHook(HookBase):
    """Training scalars every ``log_every`` steps and at the last one; the first step of a run
    is shown on the terminal too (not logged), so a slow first window is not silent."""

    def __init__(self, log_every: int) -> None:
        self.log_every = log_every
        self.first: int | None = None

    def after_step(self, trainer: Trainer) -> None:
        step = trainer.state.step
        if self.first is None:
            self.first = step
            if step % self.log_every and step != trainer.total_steps:
                trainer.log.show(step, {**trainer.scalars,
                                        "img_per_s": trainer.meter.images_per_second()})  # fmt: skip
                return
        if step % self.log_every and step != trainer.total_steps:
            return
        scalars = mean_across_ranks(trainer.scalars, trainer.env)
        scalars["img_per_s"] = trainer.meter.images_per_second()
        scalars["epoch"] = trainer.state.epoch
        if trainer.env.device.type == "cuda":  # detectron2's max_mem, in GiB
            scalars["max_mem_gib"] = torch.cuda.max_memory_allocated(trainer.env.device) / 2**30
        trainer.log.log_train(step, scalars)


class EvalHook(HookBase):
    """Evaluate the (EMA) model on the held-out loader every ``eval_every`` steps before the
    last, and after training; the metrics go to the log and ``trainer.metrics``. With ``best``,
    each evaluation may write the best checkpoint and stop training early."""

    def __init__(self, loader: Any, eval_every: int | None,
                 best: BestCheckpoint | None = None) -> None:  # fmt: skip
        self.loader, self.eval_every, self.best = loader, eval_every, best
        self.evaluated_step: int | None = None
        self.step = 0  # the trainer's step as of the last call: what a checkpoint saves with

    def evaluate(self, trainer: Trainer) -> None:
        state = trainer.state
        model = state.saved_weights
        trainer.metrics = evaluate(model, trainer.task, self.loader, device=state.device,
                                   amp=state.amp)  # fmt: skip
        self.evaluated_step = state.step
        # top5 of a 5-class problem is 100 % whatever the model: the line leaves it out
        hide = trivial_top_k(trainer.metrics, getattr(trainer.task, "num_classes", None))
        trainer.log.log_eval(state.step, trainer.metrics, hide=hide)
        if self.best is not None:
            note = self.best.observe(state.step, trainer.metrics, model)
            if note is not None:
                trainer.log.message(note)
            trainer.stop_early = self.best.should_stop
        trainer.meter.restart()

    def before_train(self, trainer: Trainer) -> None:
        self.step = trainer.state.step
        if self.best is None:
            return
        self.best.start()
        if self.best.should_stop:  # a run that stopped early, resumed with the same patience
            trainer.stop_early = True
            trainer.log.message(f"{self.best.stop_note(self.step)}; raise --patience to train on")

    def after_step(self, trainer: Trainer) -> None:
        step = self.step = trainer.state.step
        if self.eval_every and step % self.eval_every == 0 and step < trainer.total_steps:
            self.evaluate(trainer)

    def after_train(self, trainer: Trainer) -> None:
        if self.evaluated_step != trainer.state.step:  # an early stop has just evaluated
            self.evaluate(trainer)

    def state_dict(self) -> dict[str, Any]:
        if self.best is None:
            return {}
        return {"step": self.step, "best": self.best.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state.get("step", 0))
        if self.best is not None and "best" in state:
            self.best.load_state_dict(state["best"], self.step)


class CheckpointHook(HookBase):
    """Checkpoints every ``save_every`` steps, on a stop signal, and at the end."""

    def __init__(self, save_every: int | None, keep_last: int, meta: dict[str, Any],
                 saved: Saved) -> None:  # fmt: skip
        self.save_every, self.keep_last, self.meta, self.saved = save_every, keep_last, meta, saved
        self.last: Path | None = None

    def save(self, trainer: Trainer, periodic: bool) -> Path:
        """Commit a checkpoint of the trainer's state unless one of this step exists; never
        one of weights that are non-finite or give non-finite outputs on the last batch
        (TrainingDiverged instead). Returns ``RUN/checkpoints/last.safetensors``."""
        state, env, run_dir, saved = trainer.state, trainer.env, trainer.run_dir, self.saved
        layout = ckpt.RunLayout(run_dir)
        last = layout.last_weights
        if state.step == saved.step and saved.path is not None:
            return last if last.exists() else saved.path
        problem = unsaveable(state, trainer.task, trainer.last_batch)
        if any_rank(problem is not None, env):
            raise TrainingDiverged(diverged_message(
                run_dir, f"{problem or 'another rank diverged'} at step {state.step}", saved))
        payload = state.state_dict(rngs=gather_objects(ckpt.rng_state(), env),
                                   world_size=env.world_size, hooks=trainer.hooks)  # fmt: skip
        path, error = None, None
        if env.is_main:
            try:
                path = ckpt.save_checkpoint(layout.checkpoints, weights=state.saved_weights,
                                            metadata=self.meta, state=payload, step=state.step,
                                            periodic=periodic, keep_last=self.keep_last)  # fmt: skip
            except OSError as exc:  # e.g. disk full: the previous checkpoint is intact
                error = exc
        if any_rank(error is not None, env):  # every rank stops, none waits on a barrier forever
            raise error or OSError(f"rank 0 could not save the checkpoint of step {state.step}")
        saved.path = path or ckpt.step_weights(layout.checkpoints, state.step)
        saved.step = state.step
        return last

    def after_step(self, trainer: Trainer) -> None:
        step = trainer.state.step
        if self.save_every and step % self.save_every == 0:
            self.last = self.save(trainer, periodic=True)
        if any_rank(trainer.stop.signum is not None, trainer.env):
            path = self.save(trainer, periodic=False)
            # The exception says it (cf train prints it as its one line): no log line besides.
            raise TrainingInterrupted(trainer.stop.signum or signal.SIGTERM, step, path)

    def after_train(self, trainer: Trainer) -> None:
        self.last = self.save(trainer, periodic=False)
