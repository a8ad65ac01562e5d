"""torchrun in the tests: a run folder under the elastic agent, its workers, and kills.

The agent is ``python -m torch.distributed.run`` with a c10d rendezvous on ``localhost:0``
(the agent picks a free port: nothing bound to a fixed one); its workers are its child
processes, found through ``/proc`` (Linux, as gloo's tests are). Waits are for events (a
step in ``metrics.jsonl``, a process exit); their deadline is only the safety net of
:mod:`waiting`.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file
from waiting import SAFETY_NET_S

TESTS = Path(__file__).resolve().parent


def torchrun(nproc: int, *flags: str) -> list[str]:
    """The agent's command up to the script: ``nproc`` workers, c10d on a free local port."""
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
            "--rdzv-backend", "c10d", "--rdzv-endpoint", "localhost:0", *flags]  # fmt: skip


def start(command: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    """``command`` with one thread per process, stdout and stderr into ``log``."""
    child_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    with log.open("w") as out:
        return subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=child_env)


def finish(proc: subprocess.Popen, log: Path) -> str:
    """Wait for ``proc``; its output (the whole log)."""
    try:
        proc.wait(timeout=SAFETY_NET_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError(f"torchrun hangs; its log:\n{log.read_text()[-4000:]}") from None
    return log.read_text()


def children(pid: int) -> list[int]:
    """The live child processes of ``pid`` (torchrun's workers), oldest first."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == pid and fields[0] != "Z":
            out.append(int(entry.name))
    return sorted(out)


def trained_steps(run: Path) -> list[int]:
    """The training steps ``run/metrics.jsonl`` has logged so far."""
    try:
        lines = (run / "metrics.jsonl").read_text().splitlines()
    except OSError:
        return []
    steps = []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:  # a line being written
            continue
        if record.get("split") == "train":
            steps.append(int(record["step"]))
    return steps


def wait_for_step(run: Path, step: int, proc: subprocess.Popen, log: Path) -> None:
    """Return once ``run`` has logged training step ``step``; fail if ``proc`` exits first."""
    deadline = time.monotonic() + SAFETY_NET_S
    while max(trained_steps(run), default=0) < step:
        if proc.poll() is not None:
            raise AssertionError(f"torchrun exited ({proc.returncode}) before step {step}:\n"
                                 f"{log.read_text()[-4000:]}")  # fmt: skip
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"step {step} not reached: the run hangs")
        time.sleep(0.05)


def kill_worker(agent: subprocess.Popen, which: int = -1) -> int:
    """SIGKILL one of the agent's workers (``which``: index among them, oldest first)."""
    workers = children(agent.pid)
    assert workers, "torchrun has no workers to kill"
    pid = workers[which]
    os.kill(pid, signal.SIGKILL)
    return pid


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "checkpoints" / "last.safetensors")
