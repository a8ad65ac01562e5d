"""Process-group setup from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK).

One code path for every launch: a plain ``cf train`` is world size 1 with no process
group; under ``torchrun`` the group is NCCL on CUDA and gloo on CPU.

Elastic restarts. torchrun's agent (``--max-restarts``) starts a new worker group after a
worker dies, numbering it in ``TORCHELASTIC_RESTART_COUNT``. Since torch 2.4 the agent keeps
one TCPStore for all its rounds (``TORCHELASTIC_USE_AGENT_STORE``) and the ``env://``
rendezvous hands workers that store without a per-round prefix, so the keys of the dead
group (each rank's gloo address) are still there: a restarted rank that reads them before
its peer has rewritten them connects to a port nobody listens on any more ("Connection
refused" in gloo's full-mesh connect), and whether it does is a race that a slower start
(imports, reading the dataset index) loses. :func:`setup_distributed` therefore builds the
process group on the agent's store under a prefix naming the restart, so each round only
sees its own keys. Nothing binds a fixed port: the store's address is the agent's.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits: ``rank`` of ``world_size``, on ``device``."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    initialized_here: bool = False
    restart_count: int = 0  # torchrun's worker-group restarts so far (0: the first start)
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


def restart_count() -> int:
    """How often torchrun's elastic agent has restarted the worker group (0 outside it)."""
    try:
        return max(int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")), 0)
    except ValueError:
        return 0


def _agent_store() -> dist.Store | None:
    """A client of the elastic agent's store, which outlives worker groups (None when the
    agent does not share one: then rank 0 hosts the ``env://`` store and it dies with it)."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    return dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                         is_master=False, timeout=PG_TIMEOUT)  # fmt: skip


def _round_store(store: dist.Store | None, rank: int, world_size: int) -> dist.Store:
    """``store`` (else the ``env://`` one) under a prefix that names this worker-group round,
    so keys a dead round left behind are never read (see the module docstring)."""
    if store is None:
        store, _, _ = next(dist.rendezvous("env://", rank=rank, world_size=world_size,
                                           timeout=PG_TIMEOUT))  # fmt: skip
    return dist.PrefixStore(f"clusterformer/round-{restart_count()}", store)


def _started_key(run_dir: Path) -> str:
    return f"clusterformer/started/{Path(run_dir).resolve()}"


def mark_started(env: DistEnv, run_dir: Path) -> None:
    """Main rank, once the run folder is checked and ready (before step 1): note in the
    agent's store that this torchrun job trains ``run_dir``, so its restarted groups resume it
    (:func:`resumes_after_restart`). Without an agent store there is nothing to note in."""
    if env.is_main and env.store is not None:
        env.store.set(_started_key(run_dir), "1")


def resumes_after_restart(env: DistEnv, run_dir: Path) -> bool:
    """Whether this worker group is a restart, by torchrun's agent, of a group of the same job
    that had started training ``run_dir`` (then it continues the run by itself). A first
    group that refused the folder (no ``--resume``) marked nothing, so its restart refuses
    again instead of resuming a run the user did not ask to continue. Every rank reads the
    same store, so all agree."""
    return env.restart_count > 0 and env.store is not None and env.store.check(
        [_started_key(run_dir)])  # fmt: skip


def setup_distributed(device: str | None = None) -> DistEnv:
    """Initialise the process group when launched by torchrun (``WORLD_SIZE > 1``).

    Reuses a group that is already initialised (e.g. by a test harness).
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    restarts = restart_count()
    store = _agent_store()
    if dist.is_available() and dist.is_initialized():
        world_size, rank = dist.get_world_size(), dist.get_rank()
        dev = pick_device(device, local_rank)
        return DistEnv(rank, world_size, local_rank, dev, False, restarts, store)
    dev = pick_device(device, local_rank)
    if world_size <= 1:
        return DistEnv(0, 1, 0, dev, False, restarts, store)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    dist.init_process_group(backend=backend, store=_round_store(store, rank, world_size),
                            rank=rank, world_size=world_size, timeout=PG_TIMEOUT)  # fmt: skip
    return DistEnv(rank, world_size, local_rank, dev, True, restarts, store)


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
