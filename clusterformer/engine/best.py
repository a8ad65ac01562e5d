"""The best checkpoint by a held-out metric, and early stopping on it.

After each evaluation during training, :class:`BestCheckpoint` compares the chosen metric
(``--best-metric``; default the task's headline, ``TaskSpec.primary_metric``, with the direction
``TaskSpec.improves`` gives) with the best so far. A better value writes
``RUN/checkpoints/best.safetensors`` (the evaluated weights -- the EMA ones when EMA is on --
with the usual metadata plus ``best_metric``, ``best_value``, ``step``). Every evaluation
rewrites ``RUN/checkpoints/best.json`` (metric, best value and step, evaluations since then,
the step last evaluated); each file is whole-or-nothing (temporary file, fsync, rename). With
``--patience N`` training stops after N evaluations in a row without improvement.

Across ``--resume``: the best value and the patience counter are part of each checkpoint's
training state (:meth:`BestCheckpoint.state_dict`), so a resumed run counts on from the
checkpoint it continues. Evaluations after that checkpoint are run again and counted again,
except one: the last evaluation of a finished run comes after its final checkpoint, and is
taken from ``best.json``. An old best on disk is never overwritten by a worse one.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from torch import nn

from clusterformer.engine import files
from clusterformer.engine.checkpoint import (
    BEST_RECORD,
    BEST_WEIGHTS,
    encode_metadata,
    weights_bytes,
)
from clusterformer.tasks import TaskSpec


class BestCheckpoint:
    """Tracks the best value of ``metric``; :meth:`observe` after each evaluation.

    Args:
        ckpt_dir: ``RUN/checkpoints``.
        spec: the task's spec (the metric's direction).
        metric: the metric key (one of the evaluator's keys).
        patience: evaluations without improvement before :meth:`observe` says stop; ``None``
            never stops.
        meta: the checkpoint metadata (model config, task, categories, normalisation).
        is_main: only the main rank writes.
    """

    def __init__(self, ckpt_dir: Path, spec: TaskSpec, metric: str, patience: int | None,
                 meta: dict[str, Any], *, is_main: bool = True) -> None:  # fmt: skip
        self.ckpt_dir, self.spec, self.metric, self.patience = ckpt_dir, spec, metric, patience
        self.meta, self.is_main = meta, is_main
        self.best: float | None = None
        self.best_step: int | None = None
        self.stale = 0  # evaluations since the last improvement
        self.evaluated_step: int | None = None  # the step of the last evaluation counted
        self._resumed: tuple[dict[str, Any], int] | None = None

    def start(self) -> None:
        """Before step 1 (after ``--restart`` has cleared the folder): the best so far from
        ``best.json``, then the state of the checkpoint a resumed run continues."""
        record = read_best(self.ckpt_dir)
        if record is None or record["metric"] != self.metric:
            record = None
        else:
            self.best, self.best_step = float(record["value"]), int(record["step"])
        if self._resumed is None:
            return
        state, step = self._resumed
        self.stale, self.evaluated_step = int(state["stale"]), state.get("evaluated_step")
        after = record.get("evaluated_step") if record is not None else None
        if isinstance(after, int) and (self.evaluated_step or 0) < after <= step:
            self.stale, self.evaluated_step = int(record.get("stale", 0)), after
        saved = state.get("best")
        if saved is not None and self.spec.improves(self.metric, float(saved), self.best):
            self.best, self.best_step = float(saved), int(state["best_step"])

    def observe(self, step: int, metrics: dict[str, Any], weights: nn.Module) -> str | None:
        """Record one evaluation; write the best checkpoint when it improved. Returns a line
        to log (a new best, or why training stops early), ``None`` otherwise. A second
        evaluation of the same step (a resumed run with no step left) counts once.

        Raises:
            ValueError: the evaluator has no ``metric`` (naming the ones it has).
        """
        if self.metric not in metrics:
            raise ValueError(f"--best-metric {self.metric}: not a metric of the {self.spec.name} "
                             f"evaluation (it has {', '.join(sorted(metrics))})")  # fmt: skip
        if step == self.evaluated_step:
            return None
        value = float(metrics[self.metric])
        improved = math.isfinite(value) and self.spec.improves(self.metric, value, self.best)
        if improved:
            self.best, self.best_step, self.stale = value, step, 0
        else:
            self.stale += 1
        self.evaluated_step = step
        try:
            self._write(step, value, weights if improved else None)
        except OSError as exc:  # e.g. a full disk: the run and its checkpoints go on
            return (f"warning: could not write {self.ckpt_dir / BEST_WEIGHTS} ({exc}); "
                    "training continues") + (f"\n{self.stop_note(step)}" if self.should_stop
                                             else "")  # fmt: skip
        if improved:
            return (f"new best {self.metric} {value:.4g} at step {step}: "
                    f"{self.ckpt_dir / BEST_WEIGHTS}")  # fmt: skip
        return self.stop_note(step) if self.should_stop else None

    def stop_note(self, step: int) -> str:
        """Why training stops at ``step`` (patience used up)."""
        return (f"early stop at step {step}: {self.metric} has not improved for {self.stale} "
                f"evaluations (best {self.best:.4g} at step {self.best_step})")  # fmt: skip

    @property
    def should_stop(self) -> bool:
        return self.patience is not None and self.stale >= self.patience

    def state_dict(self) -> dict[str, Any]:
        """The best so far and the patience counter, for the checkpoint's training state."""
        return {"metric": self.metric, "best": self.best, "best_step": self.best_step,
                "stale": self.stale, "evaluated_step": self.evaluated_step}  # fmt: skip

    def load_state_dict(self, state: dict[str, Any], step: int) -> None:
        """Continue from the state a checkpoint of ``step`` saved (taken up by :meth:`start`).
        A state of another ``--best-metric`` is left aside: counting starts afresh.
        ``best.json`` supplies the evaluation of ``step`` itself when it ran after the
        checkpoint was saved, and the best value when it is better than the saved one."""
        if state.get("metric") == self.metric:
            self._resumed = (state, step)

    def _write(self, step: int, value: float, weights: nn.Module | None) -> None:
        """``best.safetensors`` when ``weights`` (an improvement), then ``best.json``."""
        if self.best is None or not self.is_main:
            return
        files.make_dir(self.ckpt_dir)
        if weights is not None:
            meta = {**self.meta, "step": step, "best_metric": self.metric, "best_value": value}
            files.atomic_write_bytes(self.ckpt_dir / BEST_WEIGHTS,
                                     weights_bytes(weights, encode_metadata(meta)))  # fmt: skip
        record = {"metric": self.metric, "value": self.best, "step": self.best_step,
                  "weights": BEST_WEIGHTS, "stale": self.stale, "evaluated_step": step}  # fmt: skip
        files.atomic_write_json(self.ckpt_dir / BEST_RECORD, record)


def read_best(ckpt_dir: Path) -> dict[str, Any] | None:
    """``RUN/checkpoints/best.json`` (metric, value, step, stale, evaluated_step) or ``None``
    when absent/unreadable."""
    try:
        record = json.loads((Path(ckpt_dir) / BEST_RECORD).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and {"metric", "value", "step"} <= set(record) else None
