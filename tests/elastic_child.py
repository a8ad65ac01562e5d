"""``cf`` for torchrun, with rank 0 of the first worker group SIGKILLed halfway through writing
the checkpoint of step ``CF_TEST_DIE_IN_SAVE`` (a torn write, as ``kill -9`` or a node loss
mid-save leaves it). Restarted groups (``TORCHELASTIC_RESTART_COUNT`` > 0) run ``cf`` as is.

Usage: ``torchrun ... tests/elastic_child.py RUN_DIR cf-args...``
"""

from __future__ import annotations

import os
import runpy
import sys
from pathlib import Path

from kill_points import FileOps


class DieInSave(FileOps):
    """Dies at the first write of a file inside the temporary folder of step ``step``."""

    def __init__(self, root: Path, step: int) -> None:
        super().__init__(root, kill_at=None, when="torn")
        self.marker = f"step-{step:06d}.tmp-"

    def _step(self, name, path, run, torn=None):  # noqa: ANN001, ANN202
        if self.kill_at is None and name == "write" and path and self.marker in path:
            self.kill_at = len(self.ops) + 1  # this very operation, half written
        return super()._step(name, path, run, torn)


if __name__ == "__main__":
    run_dir, *args = sys.argv[1:]
    first_round = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
    if first_round and os.environ.get("RANK") == "0":
        folder = Path(run_dir) / "checkpoints"
        folder.mkdir(parents=True, exist_ok=True)  # realpath of the root needs it to exist
        DieInSave(folder, int(os.environ["CF_TEST_DIE_IN_SAVE"])).install()
    sys.argv = ["cf", *args]
    runpy.run_module("clusterformer.cli", run_name="__main__", alter_sys=True)
