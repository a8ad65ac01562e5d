"""Run the `cf` command line in-process, as tests need it: the exit code instead of SystemExit."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from clusterformer.cli.app import main

# ``cf`` in a child process (``python -m``: no dependence on the venv's script path).
CF_MODULE = ("-m", "clusterformer.cli")


def run_cf(args: list[str]) -> int:
    """``cf ARGS`` through the real entry point (one-line errors included); returns its exit code."""
    try:
        main(["--debug", *args] if os.environ.get("CF_TEST_DEBUG") else args)
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


def run_cf_child(
    args: list[object], *, env: dict[str, str] | None = None, launcher: tuple[str, ...] = (),
    timeout: float = 600,
) -> subprocess.CompletedProcess:
    """``cf ARGS`` in a child process with one thread (plus ``env``), output captured.
    ``launcher`` goes between the interpreter and the module (e.g. ``torch.distributed.run``
    and its options)."""
    command = [sys.executable, *launcher, *CF_MODULE, *map(str, args)]
    child_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(command, env=child_env, capture_output=True, text=True, timeout=timeout)


def train_argv(
    data: Path, run: Path, steps: int, *extra: str, seed: int = 0, log_every: int = 100
) -> list[str]:
    """``cf train`` arguments for a small classification run (batch 4, 32 px, lr 1e-3)."""
    return ["train", "--task", "classification", "--data", str(data), "--out", str(run),
            "--steps", str(steps), "--batch-size", "4", "--image-size", "32", "--lr", "1e-3",
            "--seed", str(seed), "--log-every", str(log_every), *extra]  # fmt: skip
