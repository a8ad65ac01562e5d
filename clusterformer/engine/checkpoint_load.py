"""Reading checkpoints: weights into a model (checked to fit and to be finite), a backbone from
any checkpoint, the training state (``weights_only``), and the newest complete checkpoint to
resume (see :mod:`clusterformer.engine.checkpoint`)."""

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
    _LEGACY_STEP,
    _STEP_DIR,
    WEIGHTS,
    CheckpointError,
    _step_dirs,
    _unreadable,
    read_metadata,
    resolve_checkpoint,
    state_path_for,
)
from clusterformer.engine.finite import first_non_finite


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
        raise _unreadable(path, exc) from None
    own = module.state_dict()
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


BACKBONE_PARTS = ("stem.", "downsamples.", "stages.")


def load_pretrained_backbone(module: nn.Module, path: str | Path) -> int:
    """Initialise ``module``'s backbone from any clusterformer checkpoint's backbone.

    The source may be a classifier (backbone tensors at the top level) or a dense model
    (under ``backbone.``); the target is ``module.backbone`` when it has one, else
    ``module`` itself. Heads are never copied, so the class count may differ. Returns the
    number of tensors loaded.

    Raises:
        ValueError: the checkpoint has no backbone tensors, or they do not fit (another
            preset): the message names the first tensor that differs.
    """
    path = resolve_checkpoint(path)
    read_metadata(path)  # a clusterformer checkpoint, or a clear error
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise _unreadable(path, exc) from None
    prefix = "backbone." if any(k.startswith("backbone.") for k in tensors) else ""
    source = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    source = {k: v for k, v in source.items() if k.startswith(BACKBONE_PARTS)}
    target = getattr(module, "backbone", module)
    own = {k: v for k, v in target.state_dict().items() if k.startswith(BACKBONE_PARTS)}
    if not source:
        raise ValueError(f"{path}: no backbone weights in this checkpoint")
    for name in sorted(set(own) | set(source)):
        if name not in source or name not in own or source[name].shape != own[name].shape:
            theirs = tuple(source[name].shape) if name in source else "absent"
            ours = tuple(own[name].shape) if name in own else "absent"
            raise ValueError(f"{path}: backbone does not fit this model ({name}: checkpoint "
                             f"{theirs}, model {ours}); pretrain the same --model preset")  # fmt: skip
    bad = first_non_finite(source)
    if bad is not None:
        raise ValueError(f"{path}: backbone tensor {bad} holds NaN or infinity (a diverged "
                         "run); pretrain again or use an earlier checkpoint")  # fmt: skip
    target.load_state_dict(source, strict=False)
    return len(source)


def load_state(path: str | Path) -> dict[str, Any]:
    """The training state beside a weights file (or at ``path``), read with weights_only.

    Raises:
        FileNotFoundError: no state file; CheckpointError: a file that is not a training
            state (including one holding Python objects, which a safe load refuses).
    """
    p = Path(path)
    if p.suffix == ".safetensors" or p.is_dir():
        p = state_path_for(resolve_checkpoint(p))
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


def holds_weights(ckpt_dir: Path) -> bool:
    """Whether ``ckpt_dir`` holds any checkpoint weights (complete or not)."""
    if not ckpt_dir.is_dir():
        return False
    return any(p.name.endswith(".safetensors") or (_STEP_DIR.match(p.name) and p.is_dir())
               for p in ckpt_dir.iterdir() if not p.name.startswith("."))  # fmt: skip


def _candidates(ckpt_dir: Path) -> list[tuple[int, Path]]:
    """(step, weights) to try for resume, newest first: ``step-*`` folders, then the flat
    files of older versions (``last.*``, ``step-N.*``), whose step is read from the state."""
    found = [(step, d / WEIGHTS) for step, d in _step_dirs(ckpt_dir)]
    legacy = [ckpt_dir / "last.safetensors"] if not (ckpt_dir / "last").is_symlink() else []
    legacy += [p for p in ckpt_dir.glob("step-*.safetensors") if _LEGACY_STEP.match(p.name)]
    for weights in legacy:
        if weights.is_file() and not weights.is_symlink():
            try:
                step = int(read_metadata(weights).get("step", -1))
            except CheckpointError:
                step = -1
            found.append((step, weights))
    return sorted(found, key=lambda item: (item[0], item[1].name == WEIGHTS), reverse=True)


def find_resumable(
    ckpt_dir: Path, notes: list[str] | None = None
) -> tuple[Path, dict[str, Any]] | None:
    """The newest complete checkpoint: ``(weights, state)`` whose files read and agree on the
    step. None when ``ckpt_dir`` holds no weights at all.

    Raises:
        CheckpointError: weights are there but no checkpoint is complete (the message says
            why for the newest one).
    """
    problems: list[str] = []
    for _, weights in _candidates(ckpt_dir):
        try:
            state = load_state(weights)
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
        why = problems[0] if problems else f"{ckpt_dir}: weights without training state"
        raise CheckpointError(f"cannot resume: {why}; pass --restart to start over or choose "
                              "another --out")  # fmt: skip
    return None
