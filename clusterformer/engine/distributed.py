"""Process-group setup from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK).

One code path for every launch: a plain ``cf train`` is world size 1 with no process
group; under ``torchrun`` the group is NCCL on CUDA and gloo on CPU.

Elastic restarts: each worker group starts its process group on a store of its own
(:mod:`~clusterformer.engine.group_store` says why), and learns from the agents' store
whether an earlier group of the same torchrun job had started the run
(:func:`resumes_after_restart`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from clusterformer.engine.group_store import agent_store, group_store


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits: ``rank`` of ``world_size``, on ``device``."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    initialized_here: bool = False
    store: dist.Store | None = field(default=None, repr=False, compare=False)  # the agent's

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def pick_device(requested: str | None = None, local_rank: int = 0) -> torch.device:
    """``requested`` ("cpu", "cuda", "cuda:1") or CUDA (this local rank's GPU) when present."""
    if requested:
        device = torch.device(requested)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device '{requested}' requested but CUDA is not available")
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", local_rank)
        return device
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


# How long a rank waits for the others at start-up and in a collective: long enough for a
# slow start (a rank still reading its dataset index, a node still starting) or a long
# checkpoint write on rank 0. A dead peer is noticed at once (gloo / NCCL see the socket
# close), so this only bounds a rank that hangs.
PG_TIMEOUT = timedelta(minutes=30)


def _started_key(run_dir: Path) -> str:
    return f"clusterformer/started/{Path(run_dir).resolve()}"


def mark_started(env: DistEnv, run_dir: Path) -> None:
    """Main rank, once the run folder is checked and ready (before step 1): note in the
    agent's store that this torchrun job trains ``run_dir``, so its restarted groups resume it
    (:func:`resumes_after_restart`). Without an agent store there is nothing to note in."""
    if env.is_main and env.store is not None:
        env.store.set(_started_key(run_dir), "1")


def resumes_after_restart(env: DistEnv, run_dir: Path) -> bool:
    """Whether an earlier worker group of this torchrun job had started training ``run_dir``
    (then this one, a restart, continues the run by itself). Asked of the agents' store, not of
    ``TORCHELASTIC_RESTART_COUNT``: that is each agent's own count, and an agent whose workers
    are restarted because another node's failed does not count it. A first group that refused
    the folder (no ``--resume``) marked nothing, so its restart refuses again instead of
    resuming a run the user did not ask to continue. Every rank reads the same store."""
    return env.store is not None and env.store.check([_started_key(run_dir)])


def setup_distributed(device: str | None = None) -> DistEnv:
    """Initialise the process group when launched by torchrun (``WORLD_SIZE > 1``).

    Reuses a group that is already initialised (e.g. by a test harness).
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    store = agent_store(PG_TIMEOUT)
    if dist.is_available() and dist.is_initialized():
        world_size, rank = dist.get_world_size(), dist.get_rank()
        dev = pick_device(device, local_rank)
        return DistEnv(rank, world_size, local_rank, dev, False, store)
    dev = pick_device(device, local_rank)
    if world_size <= 1:
        return DistEnv(0, 1, 0, dev, False, store)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    dist.init_process_group(backend=backend, store=group_store(store, rank, world_size, PG_TIMEOUT),
                            rank=rank, world_size=world_size, timeout=PG_TIMEOUT)  # fmt: skip
    return DistEnv(rank, world_size, local_rank, dev, True, store)


def cleanup_distributed(env: DistEnv) -> None:
    """Destroy the process group if :func:`setup_distributed` created it."""
    if env.initialized_here and dist.is_initialized():
        dist.destroy_process_group()


def reduce_device(env: DistEnv) -> torch.device:
    """The device collectives run on (NCCL needs CUDA tensors; gloo CPU ones)."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return env.device
    return torch.device("cpu")


def any_rank(flag: bool, env: DistEnv) -> bool:
    """True on every rank when ``flag`` is true on any rank (used for stop requests)."""
    if not env.distributed or not dist.is_initialized():
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=reduce_device(env))
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def mean_across_ranks(values: dict[str, float], env: DistEnv) -> dict[str, float]:
    """Average a dict of floats over ranks (same keys on every rank)."""
    if not env.distributed or not dist.is_initialized() or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=reduce_device(env))
    dist.all_reduce(t)
    t = t / env.world_size
    return {k: float(v) for k, v in zip(keys, t.tolist(), strict=True)}


def gather_objects(obj: object, env: DistEnv) -> list[object]:
    """Every rank's ``obj`` in rank order (a one-element list when not distributed)."""
    if not env.distributed or not dist.is_initialized():
        return [obj]
    out: list[object] = [None] * env.world_size
    dist.all_gather_object(out, obj)
    return out


def barrier(env: DistEnv) -> None:
    if env.distributed and dist.is_initialized():
        dist.barrier()
