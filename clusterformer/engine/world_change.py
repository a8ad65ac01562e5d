"""Resuming with another number of processes (``--nnodes 1:2``, a rerun with fewer GPUs).

The run keeps its global batch (``batch_size x world_size x accum_steps``): the gradient
accumulation takes up the change (2 processes x 1 -> 1 process x 2), and the start says so.
The schedule then stays the same too (steps per epoch are ``floor(N / global batch)`` either
way). The data position carries over only at an epoch boundary: mid-epoch, which samples
the epoch has used depends on how they were split over the old ranks (each rank reads its
own range of the epoch), so a resume there with a new world size would repeat or skip some;
it is refused, naming what changed, as is a world size that cannot make the global batch.
"""

from __future__ import annotations

import copy
from typing import Any

from clusterformer.data.epoch_plan import batches_per_rank
from clusterformer.engine.config import TrainConfig
from clusterformer.engine.run_folder import Resumable, RunFolderError


def fit_world_size(cfg: TrainConfig, found: Resumable, world_size: int, num_samples: int,
                   previous: dict[str, Any]) -> tuple[TrainConfig, list[str]]:  # fmt: skip
    """``cfg`` with the accumulation that keeps the checkpoint's global batch on
    ``world_size`` processes, and lines to show; ``cfg`` itself when nothing changed.

    ``previous``: the run folder's config.json (its batch size and accumulation).
    ``found.state`` is moved to the start of the next epoch when it sat at an epoch's end.

    Raises:
        RunFolderError: the global batch cannot be kept, or the checkpoint is mid-epoch.
    """
    before = int(found.state.get("world_size") or world_size)
    if before == world_size:
        return cfg, []
    batch = int((previous.get("data") or {}).get("batch_size") or cfg.data.batch_size)
    accum = int((previous.get("optim") or {}).get("accum_steps") or cfg.optim.accum_steps)
    global_batch = batch * before * accum
    per_pass = cfg.data.batch_size * world_size
    where = f"{found.weights}: written by {before} processes, resumed on {world_size}"
    if global_batch % per_pass:
        raise RunFolderError(f"{where}: its global batch of {global_batch} is not a multiple of "
                             f"--batch-size {cfg.data.batch_size} x {world_size} processes; "
                             "choose a --batch-size or process count that divides it")  # fmt: skip
    epoch_end = batches_per_rank(num_samples, before, batch, True, True)
    position = int(found.state.get("batches_in_epoch") or 0)
    if 0 < position < epoch_end:
        raise RunFolderError(f"{where} mid-epoch (epoch {found.state.get('epoch')}, batch "
                             f"{position} of {epoch_end}): the epoch's samples were split over "
                             f"{before} ranks; resume on {before} processes, or from a "
                             "checkpoint at an epoch's end")  # fmt: skip
    if position:  # the epoch was done: the next one starts afresh on the new ranks
        found.state["epoch"], found.state["batches_in_epoch"] = int(found.state["epoch"]) + 1, 0
    fitted = copy.deepcopy(cfg)
    fitted.optim.accum_steps = global_batch // per_pass
    return fitted, [f"world size {before} -> {world_size}: gradient accumulation "
                    f"{accum} -> {fitted.optim.accum_steps} keeps the global batch of "
                    f"{global_batch} images"]  # fmt: skip
