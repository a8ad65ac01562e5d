"""Experiment loggers (``--logger tensorboard,mlflow,wandb``): each a training hook that sends
the run's config and every scalar record written to ``metrics.jsonl`` to one more place.

* ``tensorboard`` -- event files in ``RUN/tensorboard`` (``tensorboard --logdir RUN``).
* ``mlflow`` -- a local file store in ``RUN/mlruns`` (experiment ``clusterformer``), no server.
* ``wandb`` -- an offline W&B run in ``RUN/wandb`` (``wandb sync`` uploads it later), no network.

Each package is an optional extra of the same name; :func:`build_logger_hooks` imports them
when the run is set up, so a missing one stops training with one line before it starts. A
scalar's name is ``train/<key>`` or ``val/<key>``, as in TensorBoard's layout.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from clusterformer.engine.trainer import HookBase
from clusterformer.extras import require

if TYPE_CHECKING:
    from clusterformer.engine.trainer import Trainer

MLFLOW_PARAMS_PER_CALL = 100  # MLflow's log_batch limit
MLFLOW_PARAM_CHARS = 6000  # a param value's maximum length in MLflow's stores


def scalars_of(record: Mapping[str, Any]) -> tuple[int, dict[str, float]]:
    """A metrics.jsonl record as ``(step, {"train/loss": ..., "val/top1": ...})``: its numbers
    (not booleans, not the step) under the split's prefix."""
    prefix = "val" if record.get("split") == "val" else "train"
    return int(record["step"]), {
        f"{prefix}/{key}": float(value) for key, value in record.items()
        if key != "step" and isinstance(value, int | float) and not isinstance(value, bool)
    }  # fmt: skip


def flat_config(config: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """``{"optim.lr": "0.001", ...}``: a nested config as dotted keys and text values."""
    out: dict[str, str] = {}
    for key, value in config.items():
        if isinstance(value, Mapping):
            out.update(flat_config(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = json.dumps(value) if isinstance(value, list) else str(value)
    return out


class LoggerHook(HookBase):
    """Opens its logger when training starts (rank 0 only) and gets every record the run's
    :class:`~clusterformer.engine.logging.RunLogger` writes; the RunLogger closes it."""

    def __init__(self, config: Mapping[str, Any]) -> None:
        self.config = dict(config)

    def before_train(self, trainer: Trainer) -> None:
        if trainer.log.enabled:
            self.open(trainer.run_dir)
            trainer.log.add_listener(self)

    def open(self, run_dir: Path) -> None:
        raise NotImplementedError

    def write(self, record: Mapping[str, Any]) -> None:
        step, scalars = scalars_of(record)
        if scalars:
            self.log(step, scalars)

    def log(self, step: int, scalars: dict[str, float]) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass


class TensorBoardHook(LoggerHook):
    def __init__(self, config: Mapping[str, Any]) -> None:
        super().__init__(config)
        require("tensorboard", "tensorboard", "--logger tensorboard")
        self.writer: Any = None

    def open(self, run_dir: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        text = json.dumps(self.config, indent=2).replace("\n", "\n    ")
        self.writer.add_text("config", "    " + text)  # indented: Markdown shows it as code

    def log(self, step: int, scalars: dict[str, float]) -> None:
        for name, value in scalars.items():
            self.writer.add_scalar(name, value, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


class MlflowHook(LoggerHook):
    def __init__(self, config: Mapping[str, Any]) -> None:
        super().__init__(config)
        # A local store is the point: no telemetry, and MLflow 3 refuses its file store
        # unless asked (it is in maintenance mode, still read by `mlflow ui`).
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.mlflow = require("mlflow", "mlflow", "--logger mlflow")
        self.client: Any = None
        self.run_id: str | None = None

    def open(self, run_dir: Path) -> None:
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=(run_dir.resolve() / "mlruns").as_uri())
        found = self.client.get_experiment_by_name("clusterformer")
        experiment = (found.experiment_id if found is not None
                      else self.client.create_experiment("clusterformer"))  # fmt: skip
        self.run_id = self.client.create_run(experiment, run_name=run_dir.name).info.run_id
        params = [Param(k, v[:MLFLOW_PARAM_CHARS]) for k, v in flat_config(self.config).items()]
        for start in range(0, len(params), MLFLOW_PARAMS_PER_CALL):
            self.client.log_batch(self.run_id, params=params[start:start + MLFLOW_PARAMS_PER_CALL])
        self.client.log_dict(self.run_id, self.config, "config.json")

    def log(self, step: int, scalars: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(name, value, now, step) for name, value in scalars.items()]
        self.client.log_batch(self.run_id, metrics=metrics)

    def close(self) -> None:
        if self.run_id is not None:
            self.client.set_terminated(self.run_id)
            self.run_id = None


class WandbHook(LoggerHook):
    def __init__(self, config: Mapping[str, Any]) -> None:
        super().__init__(config)
        self.wandb = require("wandb", "wandb", "--logger wandb")
        self.run: Any = None

    def open(self, run_dir: Path) -> None:
        settings = self.wandb.Settings(console="off", silent=True, x_disable_stats=True,
                                       x_disable_machine_info=True)  # fmt: skip
        self.run = self.wandb.init(mode="offline", dir=str(run_dir), project="clusterformer",
                                   name=run_dir.name, config=self.config, settings=settings)  # fmt: skip

    def log(self, step: int, scalars: dict[str, float]) -> None:
        self.run.log(scalars, step=step)

    def close(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None


HOOKS: dict[str, type[LoggerHook]] = {"tensorboard": TensorBoardHook, "mlflow": MlflowHook,
                                      "wandb": WandbHook}  # fmt: skip


def chosen_loggers(names: tuple[str, ...] | None) -> list[str]:
    """The loggers of ``runtime.loggers``: as given, none for ``("none",)``, and for ``None``
    (not set) TensorBoard when it is installed."""
    if names is None:
        try:
            require("tensorboard", "tensorboard", "TensorBoard")
        except ValueError:
            return []
        return ["tensorboard"]
    return [name for name in names if name != "none"]


def build_logger_hooks(names: tuple[str, ...] | None, config: Mapping[str, Any]) -> list[LoggerHook]:
    """One hook per chosen logger (its package imported now: MissingExtra names the extra)."""
    return [HOOKS[name](config) for name in chosen_loggers(names)]
