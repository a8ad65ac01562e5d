"""Checkpoints: safetensors weights with the model/task config in the metadata, plus the
training state (optimizer, step, RNG, data position) for ``--resume``, committed together.

Layout under ``RUN/checkpoints/``::

    step-000100/              one checkpoint, complete or absent
        model.safetensors     inference weights (EMA weights when EMA is on) + metadata
        state.pt              optimizer, grad scaler, step, epoch, batches consumed, RNG states,
                              training weights when they differ from the safetensors ones
        checkpoint.json       step, periodic or not, file sizes
    last -> step-000100       the newest checkpoint (a symlink, switched by one rename)
    last.safetensors -> last/model.safetensors
    last.state.pt    -> last/state.pt

Commit protocol, safe against a kill at any point: the three files are written and fsynced in
``.step-000100.tmp-<host>-<pid>/``, and that folder is renamed to ``step-000100``. The rename is
the commit: weights and state become visible together or not at all. Resume takes the newest
complete ``step-*`` folder. Folders are renamed away before they are deleted, so a half-deleted
folder never looks like a checkpoint; :func:`recover` removes temporaries of dead writers and
points ``last`` at the newest checkpoint. Where the file system has no symlinks,
``last.safetensors`` and ``last.state.pt`` are copies written after the commit (resume never
reads them). Runs written by older versions (``last.safetensors`` + ``last.state.pt`` files)
still resume.

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
    FORMAT,
    MANIFEST,
    STATE,
    WEIGHTS,
    CheckpointError,
    decode_metadata,
    encode_metadata,
    read_metadata,
    resolve_checkpoint,
    state_path_for,
    step_weights,
)
from clusterformer.engine.checkpoint_load import (
    BACKBONE_PARTS,
    check_finite,
    find_resumable,
    holds_weights,
    load_pretrained_backbone,
    load_state,
    load_weights,
)
from clusterformer.engine.files import atomic_write, atomic_write_text
from clusterformer.engine.rng import rng_state, set_rng_state

__all__ = [
    "BACKBONE_PARTS", "FORMAT", "MANIFEST", "STATE", "WEIGHTS", "CheckpointError", "atomic_write",
    "atomic_write_text", "check_finite", "decode_metadata", "encode_metadata", "find_resumable",
    "holds_weights", "load_pretrained_backbone", "load_state", "load_weights",
    "prune_step_checkpoints", "read_metadata", "recover", "resolve_checkpoint", "rng_state",
    "save_checkpoint", "set_rng_state", "state_bytes", "state_path_for", "step_weights",
    "weights_bytes",
]
