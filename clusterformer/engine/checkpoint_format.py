"""The checkpoint format: file names, the metadata in the safetensors header, and finding the
weights file of a run folder (see :mod:`clusterformer.engine.checkpoint` for the layout)."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open

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
    "preprocess",
    "image_size",
    "step",
    "num_classes",
    "best_value",
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
    except (SafetensorError, OSError, ValueError, RecursionError) as exc:
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
