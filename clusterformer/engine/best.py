"""The best checkpoint by a held-out metric, and early stopping on it.

After each evaluation during training, :class:`BestCheckpoint` compares the chosen metric
(``--best-metric``; default the task's headline, ``TaskSpec.primary_metric``, with the direction
``TaskSpec.improves`` gives) with the best so far. A better value writes
``RUN/checkpoints/best.safetensors`` (the evaluated weights -- the EMA ones when EMA is on --
with the usual metadata plus ``best_metric``, ``best_value``, ``step``) and
``RUN/checkpoints/best.json``, each whole-or-nothing (temporary file, fsync, rename). With
``--patience N`` training stops after N evaluations in a row without improvement. A resumed run
reads ``best.json`` so an old best is not overwritten by a worse one.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from torch import nn

from clusterformer.engine import files
from clusterformer.engine.checkpoint import encode_metadata, weights_bytes
from clusterformer.tasks import TaskSpec

BEST_WEIGHTS = "best.safetensors"
BEST_RECORD = "best.json"


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
        record = read_best(ckpt_dir)
        if record is not None and record.get("metric") == metric:
            self.best, self.best_step = float(record["value"]), int(record["step"])

    def observe(self, step: int, metrics: dict[str, Any], weights: nn.Module) -> str | None:
        """Record one evaluation; write the best checkpoint when it improved. Returns a line
        to log (a new best, or why training stops early), ``None`` otherwise.

        Raises:
            ValueError: the evaluator has no ``metric`` (naming the ones it has).
        """
        if self.metric not in metrics:
            raise ValueError(f"--best-metric {self.metric}: not a metric of the {self.spec.name} "
                             f"evaluation (it has {', '.join(sorted(metrics))})")  # fmt: skip
        value = float(metrics[self.metric])
        if math.isfinite(value) and self.spec.improves(self.metric, value, self.best):
            self.best, self.best_step, self.stale = value, step, 0
            if self.is_main:
                try:
                    self._write(step, value, weights)
                except OSError as exc:  # e.g. a full disk: the run and its checkpoints go on
                    return (f"warning: could not write {self.ckpt_dir / BEST_WEIGHTS} ({exc}); "
                            "training continues")  # fmt: skip
            return (f"new best {self.metric} {value:.4g} at step {step}: "
                    f"{self.ckpt_dir / BEST_WEIGHTS}")  # fmt: skip
        self.stale += 1
        if self.patience is not None and self.stale >= self.patience:
            return (f"early stop at step {step}: {self.metric} has not improved for {self.stale} "
                    f"evaluations (best {self.best:.4g} at step {self.best_step})")  # fmt: skip
        return None

    @property
    def should_stop(self) -> bool:
        return self.patience is not None and self.stale >= self.patience

    def _write(self, step: int, value: float, weights: nn.Module) -> None:
        meta = {**self.meta, "step": step, "best_metric": self.metric, "best_value": value}
        files.make_dir(self.ckpt_dir)
        files.atomic_write_bytes(self.ckpt_dir / BEST_WEIGHTS,
                                 weights_bytes(weights, encode_metadata(meta)))  # fmt: skip
        record = {"metric": self.metric, "value": value, "step": step, "weights": BEST_WEIGHTS}
        files.atomic_write_json(self.ckpt_dir / BEST_RECORD, record)


def read_best(ckpt_dir: Path) -> dict[str, Any] | None:
    """``RUN/checkpoints/best.json`` (metric, value, step) or ``None`` when absent/unreadable."""
    try:
        record = json.loads((Path(ckpt_dir) / BEST_RECORD).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and {"metric", "value", "step"} <= set(record) else None
