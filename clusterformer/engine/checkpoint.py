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

import errno
import io
import json
import os
import pickle
import random
import re
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes
from torch import nn

from clusterformer.engine import files
from clusterformer.engine.files import atomic_write, atomic_write_text  # noqa: F401 - public API
from clusterformer.engine.finite import first_non_finite

FORMAT = "clusterformer-checkpoint-v1"
WEIGHTS, STATE, MANIFEST = "model.safetensors", "state.pt", "checkpoint.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")
_LEGACY_STEP = re.compile(r"^step-(\d+)\.safetensors$")
# Temporaries of older versions (tempfile.mkstemp names): their writers cannot be asked.
_LEGACY_TEMP = re.compile(r"^\.(last|step-\d+)\.(safetensors|state\.pt)\..+\.tmp$")
_JSON_KEYS = (
    "model_config",
    "task_config",
    "categories",
    "normalisation",
    "image_size",
    "step",
    "num_classes",
)


class CheckpointError(ValueError):
    """A checkpoint file is unreadable or does not fit; the message names the file."""


def encode_metadata(meta: dict[str, Any]) -> dict[str, str]:
    """safetensors metadata is str -> str: structured values are stored as JSON."""
    out = {"format": FORMAT}
    for key, value in meta.items():
        out[key] = value if isinstance(value, str) and key not in _JSON_KEYS else json.dumps(value)
    return out


def decode_metadata(raw: dict[str, str] | None) -> dict[str, Any]:
    raw = dict(raw or {})
    out: dict[str, Any] = {}
    for key, value in raw.items():
        out[key] = json.loads(value) if key in _JSON_KEYS else value
    return out


def _unreadable(path: Path, exc: BaseException) -> CheckpointError:
    reason = " ".join(str(exc).split())[:120] or type(exc).__name__
    return CheckpointError(f"{path}: not a readable safetensors checkpoint ({reason}); "
                           "re-copy the file or use another checkpoint")  # fmt: skip


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The decoded metadata of a checkpoint's ``.safetensors`` file."""
    path = resolve_checkpoint(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = decode_metadata(f.metadata())
    except (SafetensorError, OSError, ValueError) as exc:
        raise _unreadable(path, exc) from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a clusterformer checkpoint (metadata has no "
                              f"'{FORMAT}' tag); pass a file written by cf train")  # fmt: skip
    return meta


def _step_dirs(ckpt_dir: Path) -> list[tuple[int, Path]]:
    """``step-*`` folders holding a manifest, newest first (complete by construction)."""
    found = []
    if ckpt_dir.is_dir():
        for p in ckpt_dir.iterdir():
            m = _STEP_DIR.match(p.name)
            if m and not p.is_symlink() and (p / MANIFEST).is_file():
                found.append((int(m.group(1)), p))
    return sorted(found, reverse=True)


def _last_target(ckpt_dir: Path) -> Path | None:
    link = ckpt_dir / "last"
    if link.is_symlink() and (ckpt_dir / os.readlink(link) / WEIGHTS).is_file():
        return ckpt_dir / os.readlink(link) / WEIGHTS
    return None


def resolve_checkpoint(path: str | Path) -> Path:
    """A run folder, its ``checkpoints`` folder, a ``step-*`` folder or a ``.safetensors``
    file -> the weights file (of the newest checkpoint for a folder)."""
    p = Path(path)
    if p.is_dir():
        for ckpt_dir in (p / "checkpoints", p):
            newest = _last_target(ckpt_dir) or next(
                (d / WEIGHTS for _, d in _step_dirs(ckpt_dir) if (d / WEIGHTS).is_file()), None
            )
            if newest is None and (ckpt_dir / "last.safetensors").is_file():
                newest = ckpt_dir / "last.safetensors"
            if newest is not None:
                return newest
        if (p / WEIGHTS).is_file():
            return p / WEIGHTS
        raise FileNotFoundError(f"{p}: no checkpoints/last.safetensors in this folder; "
                                "pass a run folder written by cf train")  # fmt: skip
    if not p.is_file():
        raise FileNotFoundError(f"{p}: checkpoint not found")
    if p.suffix != ".safetensors":
        raise CheckpointError(f"{p}: expected a .safetensors checkpoint or a run folder")
    return p


def step_weights(ckpt_dir: Path, step: int) -> Path:
    """Where checkpoint ``step``'s weights are once committed."""
    return ckpt_dir / f"step-{step:06d}" / WEIGHTS


def state_path_for(weights: Path) -> Path:
    if weights.name == WEIGHTS:
        return weights.with_name(STATE)
    return weights.with_name(weights.name[: -len(".safetensors")] + ".state.pt")


# ----------------------------------------------------------------------------- writing
def weights_bytes(module: nn.Module, metadata: dict[str, str]) -> bytes:
    """``module.state_dict()`` as safetensors bytes; tensors sharing storage are stored once
    (the dropped name maps to the kept one in the metadata, as safetensors' save_model does)."""
    tensors: dict[str, torch.Tensor] = {}
    seen: dict[tuple, str] = {}
    meta = dict(metadata)
    for name, tensor in module.state_dict().items():
        t = tensor.detach()
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride())
        if t.numel() and key in seen:
            meta.setdefault(name, seen[key])
            continue
        seen[key] = name
        tensors[name] = t.contiguous().cpu()
    return safetensors_bytes(tensors, metadata=meta)


def state_bytes(state: dict[str, Any]) -> bytes:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def save_checkpoint(
    ckpt_dir: Path,
    *,
    weights: nn.Module,
    metadata: dict[str, Any],
    state: dict[str, Any],
    step: int,
    periodic: bool = False,
    keep_last: int = 3,
) -> Path:
    """Commit checkpoint ``step-NNNNNN`` (weights + state together), point ``last`` at it and
    prune: all but the newest ``keep_last`` periodic checkpoints and the newest one go.

    Args:
        weights: the module whose ``state_dict`` is the inference weights (unwrapped).
        metadata: JSON-able dict stored in the safetensors header.
        state: tensors / primitive containers for ``state.pt``.
    Returns:
        path of ``step-NNNNNN/model.safetensors``.
    """
    blobs = {
        WEIGHTS: weights_bytes(weights, encode_metadata({**metadata, "step": step})),
        STATE: state_bytes(state),
    }
    manifest = {"format": FORMAT, "step": step, "periodic": bool(periodic),
                "files": {name: len(data) for name, data in blobs.items()}}  # fmt: skip
    blobs[MANIFEST] = (json.dumps(manifest, indent=1) + "\n").encode()
    final = step_weights(ckpt_dir, step).parent
    tag = files.temp_tag()
    tmp = ckpt_dir / f".{final.name}.tmp-{tag}"
    files.make_dir(ckpt_dir)
    files.remove_tree(tmp)
    files.make_dir(tmp)
    try:
        try:
            for name in (WEIGHTS, STATE, MANIFEST):
                files.write_bytes(tmp / name, blobs[name])
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):  # name the folder, not a temporary
                raise OSError(exc.errno, f"no space left for the checkpoint of step {step}; any "
                              "earlier one is intact: free space, then --resume",
                              str(ckpt_dir)) from None  # fmt: skip
            raise
        files.fsync_dir(tmp)
        trash = ckpt_dir / f".trash-{final.name}.tmp-{tag}"
        if final.exists():  # an unreadable folder of the same step that resume passed over
            files.rename(final, trash)
        files.rename(tmp, final)  # the commit
    except BaseException:
        files.remove_tree(tmp)
        raise
    files.fsync_dir(ckpt_dir)
    files.remove_tree(trash)
    _point_last(ckpt_dir, final.name, blobs)
    prune_step_checkpoints(ckpt_dir, keep_last)
    return final / WEIGHTS


def _point_last(ckpt_dir: Path, step_name: str, blobs: dict[str, bytes] | None = None) -> None:
    """``last`` -> ``step_name`` by one rename; ``last.safetensors``/``last.state.pt`` follow it."""
    tag = files.temp_tag()
    tmp = ckpt_dir / f".last.tmp-{tag}"
    files.remove_tree(tmp)
    try:
        files.symlink(step_name, tmp)
    except OSError:  # no symlinks on this file system: plain copies (resume never reads them)
        source = ckpt_dir / step_name
        for view, name in (("last.safetensors", WEIGHTS), ("last.state.pt", STATE)):
            data = blobs[name] if blobs else (source / name).read_bytes()
            files.atomic_write_bytes(ckpt_dir / view, data)
        return
    files.rename(tmp, ckpt_dir / "last")
    views = (("last.safetensors", f"last/{WEIGHTS}"), ("last.state.pt", f"last/{STATE}"))
    for view, inner in views:
        link = ckpt_dir / view
        if link.is_symlink() and os.readlink(link) == inner:
            continue
        tmp = ckpt_dir / f".{view}.tmp-{tag}"
        files.remove_tree(tmp)
        files.symlink(inner, tmp)
        files.rename(tmp, link)
    files.fsync_dir(ckpt_dir)


def _manifest(folder: Path) -> dict[str, Any]:
    try:
        return json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return {}


def prune_step_checkpoints(ckpt_dir: Path, keep_last: int) -> list[Path]:
    """Delete all ``step-*`` folders but the newest one and the newest ``keep_last`` periodic
    ones; returns the deleted folders. Each is renamed away first, then removed."""
    folders = _step_dirs(ckpt_dir)
    periodic = [p for _, p in folders if _manifest(p).get("periodic")]
    keep = set(periodic[: max(keep_last, 0)]) | {p for _, p in folders[:1]}
    doomed = [p for _, p in folders if p not in keep]
    tag = files.temp_tag()
    for p in doomed:
        trash = ckpt_dir / f".trash-{p.name}.tmp-{tag}"
        files.rename(p, trash)
        files.remove_tree(trash)
    return doomed


def recover(ckpt_dir: Path) -> list[Path]:
    """Remove temporaries left by writers that died (a kill mid-save) and point ``last`` at the
    newest complete checkpoint. Returns the removed paths."""
    removed = files.remove_dead_temps(ckpt_dir, legacy=_LEGACY_TEMP)
    folders = _step_dirs(ckpt_dir)
    link = ckpt_dir / "last"
    if folders and (not link.is_symlink() or os.readlink(link) != folders[0][1].name
                    or not (ckpt_dir / "last.safetensors").exists()):  # fmt: skip
        _point_last(ckpt_dir, folders[0][1].name)
    return removed


# ----------------------------------------------------------------------------- reading
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


def rng_state() -> dict[str, Any]:
    """Python, numpy, torch (and CUDA) RNG states as tensors and primitives."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {
            "name": name,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached": float(cached),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`rng_state`."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state(
        (n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"])
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
