"""Checkpoints and the run folder: the one public module (import from here, not from the files
behind it).

Behind it, one idea a file:

* :mod:`~clusterformer.engine.checkpoint_format` -- the run folder's layout (:class:`RunLayout`:
  every file a run folder holds and its name), the metadata in the safetensors header, finding a
  run folder's weights;
* :mod:`~clusterformer.engine.train_state` -- :class:`TrainState`, what changes while training,
  and its ``state_dict`` (optimizer, scaler, step, loader position, RNG, each hook's state);
* :mod:`~clusterformer.engine.checkpoint_commit` -- writing: the commit protocol below;
* :mod:`~clusterformer.engine.checkpoint_load` -- reading: weights, the training state, the
  newest complete checkpoint to resume.

Layout under ``RUN/checkpoints/``::

    step-000100/              one checkpoint, complete or absent
        model.safetensors     inference weights (EMA weights when EMA is on) + metadata
        state.pt              TrainState.state_dict(): optimizer, grad scaler, step, epoch,
                              batches consumed, RNG states, each hook's state, training weights
                              when they differ from the safetensors ones
        checkpoint.json       step, periodic or not, file sizes
    last -> step-000100       the newest checkpoint (a symlink, switched by one rename)
    last.safetensors -> last/model.safetensors
    last.state.pt    -> last/state.pt
    best.safetensors, best.json   the best evaluation so far (:mod:`clusterformer.engine.best`)

Commit protocol, safe against a kill at any point: the three files are written and fsynced in
``.step-000100.tmp-<host>-<pid>/``, and that folder is renamed to ``step-000100``. The rename is
the commit: weights and state become visible together or not at all. Resume takes the newest
complete ``step-*`` folder. Folders are renamed away before they are deleted, so a half-deleted
folder never looks like a checkpoint; :func:`recover` removes temporaries of dead writers and
points ``last`` at the newest checkpoint. Where the file system has no symlinks,
``last.safetensors`` and ``last.state.pt`` are copies written after the commit (resume never
reads them).

Loading never unpickles: weights are safetensors, and ``state.pt`` (tensors and primitive
containers only) is read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

from clusterformer.engine.checkpoint_commit import (
    prune_step_checkpoints,
    recover,
    save_checkpoint,
    state_bytes,
    weights_bytes,
)
from clusterformer.engine.checkpoint_format import (
    BEST_RECORD,
    BEST_WEIGHTS,
    FORMAT,
    LAST_WEIGHTS,
    MANIFEST,
    METRICS,
    STATE,
    WEIGHTS,
    CheckpointError,
    RunLayout,
    decode_metadata,
    encode_metadata,
    holds_weights,
    read_metadata,
    resolve_checkpoint,
    step_folder,
    step_folders,
    step_weights,
)
from clusterformer.engine.checkpoint_load import (
    check_finite,
    find_resumable,
    load_state,
    load_weights,
)
from clusterformer.engine.files import atomic_write, atomic_write_text
from clusterformer.engine.rng import rng_state, set_rng_state
from clusterformer.engine.train_state import ModelEma, Stateful, TrainState

__all__ = [
    "BEST_RECORD", "BEST_WEIGHTS", "FORMAT", "LAST_WEIGHTS", "MANIFEST", "METRICS", "STATE",
    "WEIGHTS", "CheckpointError", "ModelEma", "RunLayout", "Stateful", "TrainState",
    "atomic_write", "atomic_write_text", "check_finite", "decode_metadata", "encode_metadata",
    "find_resumable", "holds_weights", "load_state", "load_weights", "prune_step_checkpoints",
    "read_metadata", "recover", "resolve_checkpoint", "rng_state", "save_checkpoint",
    "set_rng_state", "state_bytes", "step_folder", "step_folders", "step_weights",
    "weights_bytes",
]
