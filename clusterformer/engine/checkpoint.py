"""Checkpoints: safetensors weights with the model/task config in the metadata, plus a
separate training-state file (optimizer, step, RNG, data position) for ``--resume``.

Layout under ``RUN/checkpoints/``::

    last.safetensors       inference weights (EMA weights when EMA is on) + metadata
    last.state.pt          optimizer, grad scaler, step, epoch, batches consumed, RNG states,
                           training weights when they differ from the safetensors ones
    step-000100.safetensors / step-000100.state.pt   the last K periodic checkpoints

Every file is written to a temporary name in the same folder and moved into place with
``os.replace``, so a crash never leaves a half-written file under a final name. The state
file holds only tensors and primitive containers: ``torch.load(weights_only=True)`` reads it.
"""

from __future__ import annotations

import json
import os
import random
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_model, save_model
from torch import nn

FORMAT = "clusterformer-checkpoint-v1"
_STEP_RE = re.compile(r"^step-(\d+)\.safetensors$")
_UMASK = os.umask(0o022)
os.umask(_UMASK)  # read the process umask once (os.umask can only be read by setting it)
_JSON_KEYS = (
    "model_config",
    "task_config",
    "categories",
    "normalisation",
    "image_size",
    "step",
    "num_classes",
)


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` on a temp file beside ``path`` then ``os.replace`` it to ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file normal permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text))


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


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The decoded metadata of a checkpoint's ``.safetensors`` file."""
    path = resolve_checkpoint(path)
    with safe_open(str(path), framework="pt") as f:
        meta = decode_metadata(f.metadata())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: not a clusterformer checkpoint (metadata has no '{FORMAT}' tag)")
    return meta


def resolve_checkpoint(path: str | Path) -> Path:
    """A run folder, its ``checkpoints`` folder or a ``.safetensors`` file -> the weights file."""
    p = Path(path)
    if p.is_dir():
        for candidate in (p / "checkpoints" / "last.safetensors", p / "last.safetensors"):
            if candidate.is_file():
                return candidate
        raise FileNotFoundError(f"{p}: no checkpoints/last.safetensors in this folder")
    if not p.is_file():
        raise FileNotFoundError(f"{p}: checkpoint not found")
    if p.suffix != ".safetensors":
        raise ValueError(f"{p}: expected a .safetensors checkpoint or a run folder")
    return p


def state_path_for(weights: Path) -> Path:
    return weights.with_name(weights.name[: -len(".safetensors")] + ".state.pt")


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
    """Write ``last.*`` (and ``step-NNNNNN.*`` when ``periodic``); prune old step files.

    Args:
        weights: the module whose ``state_dict`` is the inference weights (unwrapped).
        metadata: JSON-able dict stored in the safetensors header.
        state: tensors / primitive containers for the ``.state.pt`` file.
    Returns:
        path of ``last.safetensors``.
    """
    meta = encode_metadata({**metadata, "step": step})
    names = ["last"] + ([f"step-{step:06d}"] if periodic else [])
    for name in names:
        # State first: a weights file never exists without its state file.
        atomic_write(ckpt_dir / f"{name}.state.pt", lambda tmp: torch.save(state, tmp))
        atomic_write(
            ckpt_dir / f"{name}.safetensors",
            lambda tmp: save_model(weights, str(tmp), metadata=meta),
        )
    if periodic:
        prune_step_checkpoints(ckpt_dir, keep_last)
    return ckpt_dir / "last.safetensors"


def prune_step_checkpoints(ckpt_dir: Path, keep_last: int) -> list[Path]:
    """Delete all but the newest ``keep_last`` ``step-*`` checkpoints; returns deleted paths."""
    steps = sorted(
        (int(m.group(1)), p)
        for p in ckpt_dir.glob("step-*.safetensors")
        if (m := _STEP_RE.match(p.name))
    )
    doomed = [p for _, p in steps[: max(len(steps) - max(keep_last, 0), 0)]]
    for p in doomed:
        p.unlink(missing_ok=True)
        state_path_for(p).unlink(missing_ok=True)
    return doomed


def load_weights(module: nn.Module, path: str | Path, strict: bool = True) -> dict[str, Any]:
    """Load a checkpoint's weights into ``module``; returns its metadata."""
    path = resolve_checkpoint(path)
    meta = read_metadata(path)
    missing, unexpected = load_model(module, str(path), strict=False)
    if strict and (missing or unexpected):
        raise ValueError(
            f"{path}: weights do not match the model (missing {sorted(missing)[:3]}, "
            f"unexpected {sorted(unexpected)[:3]})"
        )
    return meta


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
    from safetensors.torch import load_file

    path = resolve_checkpoint(path)
    read_metadata(path)  # a clusterformer checkpoint, or a clear error
    tensors = load_file(str(path))
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
    target.load_state_dict(source, strict=False)
    return len(source)


def load_state(path: str | Path) -> dict[str, Any]:
    """The ``.state.pt`` beside a weights file (or at ``path``), read with weights_only."""
    p = Path(path)
    if p.suffix == ".safetensors" or p.is_dir():
        p = state_path_for(resolve_checkpoint(p))
    if not p.is_file():
        raise FileNotFoundError(f"{p}: training state not found (needed for --resume)")
    return torch.load(p, map_location="cpu", weights_only=True)


def find_resumable(ckpt_dir: Path) -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint whose weights and state files agree on the step.

    A kill between writing ``last.state.pt`` and ``last.safetensors`` leaves the pair out of
    step; the periodic ``step-*`` pairs are then the fallback. Returns (weights, state) or
    None when the folder holds no checkpoint at all.
    """
    candidates = [ckpt_dir / "last.safetensors"] + sorted(
        ckpt_dir.glob("step-*.safetensors"), key=lambda p: p.name, reverse=True
    )
    existing = [p for p in candidates if p.is_file() and state_path_for(p).is_file()]
    for weights in existing:
        state = load_state(weights)
        if int(read_metadata(weights).get("step", -1)) == int(state["step"]):
            return weights, state
    if existing:
        raise ValueError(f"{ckpt_dir}: no checkpoint whose weights and state agree on the step")
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
