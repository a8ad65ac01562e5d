"""Reading checkpoints: weights into a model (checked to fit and to be finite), the training
state (``weights_only``), and the newest complete checkpoint to resume (see
:mod:`clusterformer.engine.checkpoint`; a backbone's weights from any checkpoint are
:mod:`clusterformer.models.backbone_weights`'s)."""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from clusterformer.engine.checkpoint_format import (
    STATE,
    WEIGHTS,
    CheckpointError,
    holds_weights,
    read_metadata,
    resolve_checkpoint,
    step_folders,
    unreadable_error,
)
from clusterformer.engine.finite import first_non_finite
from clusterformer.models.layers import legacy_state_keys


def load_weights(module: nn.Module, path: str | Path, strict: bool = True) -> dict[str, Any]:
    """Load a checkpoint's weights into ``module``; returns its metadata.

    Raises:
        CheckpointError: unreadable file, or tensors that do not fit ``module`` (the message
            names the first one).
    """
    path = resolve_checkpoint(path)
    meta = read_metadata(path)
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise unreadable_error(path, exc) from None
    own = module.state_dict()
    for name in legacy_state_keys(module):  # tensors older checkpoints hold, without effect
        tensors.pop(name, None)
    for name, kept in meta.items():  # names stored once under another name (shared storage)
        if name in own and name not in tensors and isinstance(kept, str) and kept in tensors:
            tensors[name] = tensors[kept]
    for name in sorted(set(own) & set(tensors)):
        if tuple(own[name].shape) != tuple(tensors[name].shape):
            raise CheckpointError(
                f"{path}: tensor {name} is {tuple(tensors[name].shape)} in the checkpoint, "
                f"{tuple(own[name].shape)} in this model; use the checkpoint's own --model"
            )
    missing, unexpected = sorted(set(own) - set(tensors)), sorted(set(tensors) - set(own))
    if strict and (missing or unexpected):
        first = f"missing {missing[0]}" if missing else f"unexpected {unexpected[0]}"
        raise CheckpointError(f"{path}: weights do not match the model ({len(missing)} missing, "
                              f"{len(unexpected)} unexpected, e.g. {first}); use the "
                              "checkpoint's own --model")  # fmt: skip
    module.load_state_dict(tensors, strict=False)
    return meta


def check_finite(module: nn.Module, path: str | Path) -> None:
    """Refuse weights holding NaN or infinity (a diverged run) with one line naming the file."""
    bad = first_non_finite(module.state_dict())
    if bad is not None:
        raise CheckpointError(f"{path}: weights hold NaN or infinity (tensor {bad}): the run "
                              "diverged; use an earlier checkpoints/step-* or retrain with a "
                              "lower --lr")  # fmt: skip


def load_state(path: str | Path) -> dict[str, Any]:
    """The training state of a checkpoint (``state.pt`` beside its ``model.safetensors``, or of
    the newest checkpoint of a run folder, or ``path`` itself), read with weights_only.

    Raises:
        FileNotFoundError: no state file; CheckpointError: a file that is not a training
            state (including one holding Python objects, which a safe load refuses).
    """
    p = Path(path)
    if p.suffix == ".safetensors" or p.is_dir():  # last.safetensors -> last.state.pt where
        weights = resolve_checkpoint(p).resolve()  # they are copies (no symlinks)
        p = weights.with_name(STATE if weights.name == WEIGHTS else
                              weights.name.removesuffix(".safetensors") + ".state.pt")  # fmt: skip
    if not p.is_file():
        raise FileNotFoundError(f"{p}: training state not found (needed for --resume)")
    try:
        state = torch.load(p, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, ValueError,
            AttributeError, TypeError, OSError) as exc:  # fmt: skip
        kind = "holds Python objects a safe load refuses" if isinstance(
            exc, pickle.UnpicklingError) else f"unreadable: {type(exc).__name__}"  # fmt: skip
        raise CheckpointError(f"{p}: not a clusterformer training state ({kind}); resume from "
                              "another checkpoint or start over with --restart") from None
    if not isinstance(state, dict) or "step" not in state:
        raise CheckpointError(f"{p}: not a clusterformer training state (no step); resume from "
                              "another checkpoint or start over with --restart")  # fmt: skip
    return state


def find_resumable(
    ckpt_dir: Path, notes: list[str] | None = None
) -> tuple[Path, dict[str, Any]] | None:
    """The newest complete checkpoint: ``(weights, state)`` of the newest ``step-*`` folder
    whose files read and agree on the step. None when ``ckpt_dir`` holds no weights at all.

    Raises:
        CheckpointError: weights are there but no checkpoint is complete (the message says
            why for the newest one).
    """
    problems: list[str] = []
    for _, folder in step_folders(ckpt_dir):
        weights = folder / WEIGHTS
        try:
            state = load_state(folder / STATE)
            meta = read_metadata(weights)
        except (FileNotFoundError, CheckpointError) as exc:
            problems.append(str(exc).split("; ")[0])
            continue
        if int(meta.get("step", -1)) != int(state["step"]):
            problems.append(f"{weights}: weights at step {meta.get('step')}, state at step "
                            f"{state['step']}")  # fmt: skip
            continue
        if problems and notes is not None:
            notes.append(f"skipped unusable checkpoint ({problems[0]})")
        return weights, state
    if problems or holds_weights(ckpt_dir):
        why = problems[0] if problems else (f"{ckpt_dir}: weights without a complete step-* "
                                            "checkpoint folder")  # fmt: skip
        raise CheckpointError(f"cannot resume: {why}; pass --restart to start over or choose "
                              "another --out")  # fmt: skip
    return None
