"""Graceful stop: SIGTERM / SIGINT are recorded so the loop saves a checkpoint before exiting."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any


class TrainingInterrupted(Exception):
    """Raised after a checkpoint was saved because SIGTERM/SIGINT arrived."""

    def __init__(self, signum: int, step: int, path: Path | None) -> None:
        name = signal.Signals(signum).name
        super().__init__(f"{name} received: saved a checkpoint at step {step} to {path}")
        self.signum, self.step, self.path = signum, step, path
        self.exit_code = 128 + signum


class StopFlag:
    """Records SIGTERM / SIGINT instead of dying, so the loop can save first."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                return

    def _handle(self, signum: int, frame: object) -> None:
        self.signum = signum

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
