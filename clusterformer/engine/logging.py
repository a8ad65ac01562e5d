"""Run logging: RUN/metrics.jsonl, the experiment loggers, and progress on the terminal.

Only rank 0 logs. On a TTY a rich progress bar shows step, loss, lr, img/s and ETA;
otherwise (CI, files, pipes) plain lines are printed every ``log_every`` steps. Every record
written to metrics.jsonl also goes to each listener (the ``--logger`` hooks of
:mod:`clusterformer.engine.loggers`: TensorBoard, MLflow, W&B), closed with the log.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Collection
from pathlib import Path
from typing import Any, TextIO

from clusterformer.engine.checkpoint import METRICS


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf; keep the line parseable
    return value


class RunLogger:
    """Writes metrics for one run. Use as a context manager (closes files and the bar).

    Args:
        run_dir: the run folder (``metrics.jsonl`` goes here).
        total_steps: for the progress bar and ETA.
        enabled: False on ranks other than 0 (then every method is a no-op).
        start_step: the step a resumed run starts at.
        stream: where plain lines go (stderr by default); a TTY gets a rich bar.
        progress: False: plain lines even on a TTY (``--no-progress``).
    """

    def __init__(
        self,
        run_dir: Path,
        total_steps: int,
        *,
        enabled: bool = True,
        start_step: int = 0,
        stream: TextIO | None = None,
        progress: bool = True,
    ) -> None:
        self.enabled = enabled
        self.total_steps = total_steps
        self.stream = stream or sys.stderr
        self._file = None
        self._listeners: list[Any] = []
        self._progress = None
        self._task_id = None
        self._t0 = time.perf_counter()
        self._start_step = start_step
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        self._file = (run_dir / METRICS).open("a", encoding="utf-8")
        if progress and self.stream.isatty():
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeRemainingColumn,
            )

            self._progress = Progress(
                TextColumn("[bold]train"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[info]}"),
                TimeRemainingColumn(),
                transient=False,
                console=Console(file=self.stream),
            )
            self._progress.start()
            self._task_id = self._progress.add_task(
                "train", total=total_steps, completed=start_step, info=""
            )

    def __enter__(self) -> RunLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def add_listener(self, listener: Any) -> None:
        """Also hand every record to ``listener.write(record)``; ``listener.close()`` is called
        when the log closes (also when training fails)."""
        self._listeners.append(listener)

    def write(self, record: dict[str, Any]) -> None:
        """Append one JSON line (must contain ``step``) and hand the record to the listeners."""
        if not self.enabled or self._file is None:
            return
        clean = {k: _jsonable(v) for k, v in record.items()}
        try:
            self._file.write(json.dumps(clean) + "\n")
            self._file.flush()
        except OSError as exc:  # e.g. a full disk: name the log (a write error names no file)
            raise OSError(exc.errno, exc.strerror, self._file.name) from None
        for listener in self._listeners:
            listener.write(record)

    def log_train(self, step: int, scalars: dict[str, float], *, show: bool = True) -> None:
        """Record training scalars at ``step`` and update the bar or print a line."""
        if not self.enabled:
            return
        self.write({"step": step, "split": "train", **scalars})
        if show:
            self.show(step, scalars)

    def show(self, step: int, scalars: dict[str, float]) -> None:
        if not self.enabled:
            return
        info = "  ".join(_fmt(k, scalars[k]) for k in ("loss", "lr", "img_per_s", "max_mem_gib") if k in scalars)
        if self._progress is not None:
            self._progress.update(self._task_id, completed=step, info=info)
            return
        done = step - self._start_step
        elapsed = time.perf_counter() - self._t0
        eta = elapsed / done * (self.total_steps - step) if done > 0 else float("nan")
        print(
            f"step {step}/{self.total_steps}  {info}  eta {_fmt_time(eta)}",
            file=self.stream,
            flush=True,
        )

    def log_eval(self, step: int, metrics: dict[str, float], *,
                 hide: Collection[str] = ()) -> None:  # fmt: skip
        """``metrics`` to the log file; the line shown leaves out the keys in ``hide``."""
        if not self.enabled:
            return
        self.write({"step": step, "split": "val", **metrics})
        text = "  ".join(_fmt(k, v) for k, v in metrics.items() if k not in hide)
        self.message(f"eval @ step {step}: {text}")

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self._progress is not None:
            self._progress.console.print(text)
        else:
            print(text, file=self.stream, flush=True)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
        listeners, self._listeners = self._listeners, []
        for listener in listeners:
            listener.close()
        if self._file is not None:
            self._file.close()
            self._file = None


def _fmt(key: str, value: Any) -> str:
    if isinstance(value, float):
        if key == "lr":
            return f"{key} {value:.2e}"
        if key == "img_per_s":
            return f"img/s {value:.1f}"
        if key == "max_mem_gib":
            return f"mem {value:.2f}G"
        return f"{key} {value:.4g}"
    return f"{key} {value}"


def _fmt_time(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h:d}:{m:02d}:{s:02d}"
