"""Waiting in tests: for an event, never against the clock.

A test waits for something to happen (a file appears, a process exits). How long that takes
depends on the machine's load, so the only deadline is a safety net for a process that hangs:
:data:`SAFETY_NET_S`, far beyond any honest run on a busy 2-core machine. The wait ends at once
when the event happens or when the process it waits on exits first.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

SAFETY_NET_S = 900.0


def wait_for_path(path: Path, proc: subprocess.Popen, timeout: float = SAFETY_NET_S) -> None:
    """Return once ``path`` exists; fail at once if ``proc`` exits first."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            err = proc.stderr.read() if proc.stderr else ""
            raise AssertionError(f"exited ({proc.returncode}) before {path} appeared: {err}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"{path} did not appear in {timeout:.0f} s: the process hangs")
        time.sleep(0.05)
