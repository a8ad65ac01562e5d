"""Writing checkpoints: the commit protocol (weights, state and manifest renamed into place
together), ``last``, pruning, and recovery from a writer that was killed (see
:mod:`clusterformer.engine.checkpoint`)."""

from __future__ import annotations

import errno
import io
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as safetensors_bytes
from torch import nn

from clusterformer.engine import files
from clusterformer.engine.checkpoint_format import (
    FORMAT,
    LAST,
    LAST_STATE,
    LAST_WEIGHTS,
    MANIFEST,
    STATE,
    WEIGHTS,
    encode_metadata,
    step_folder,
    step_folders,
)


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
    """``state`` (tensors and primitive containers) as ``torch.save`` bytes."""
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
    final = step_folder(ckpt_dir, step)
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
        for view, name in ((LAST_WEIGHTS, WEIGHTS), (LAST_STATE, STATE)):
            data = blobs[name] if blobs else (source / name).read_bytes()
            files.atomic_write_bytes(ckpt_dir / view, data)
        return
    files.rename(tmp, ckpt_dir / LAST)
    views = ((LAST_WEIGHTS, f"{LAST}/{WEIGHTS}"), (LAST_STATE, f"{LAST}/{STATE}"))
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
    folders = step_folders(ckpt_dir)
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
    removed = files.remove_dead_temps(ckpt_dir)
    folders = step_folders(ckpt_dir)
    link = ckpt_dir / LAST
    if folders and (not link.is_symlink() or os.readlink(link) != folders[0][1].name
                    or not (ckpt_dir / LAST_WEIGHTS).exists()):  # fmt: skip
        _point_last(ckpt_dir, folders[0][1].name)
    return removed
