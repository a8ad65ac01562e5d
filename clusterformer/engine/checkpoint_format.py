"""The run folder's layout and the checkpoint format: every file name a run folder holds, the
metadata in the safetensors header, and finding the weights file of a run folder (see
:mod:`clusterformer.engine.checkpoint` for the protocol)."""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open

FORMAT = "clusterformer-checkpoint-v1"
WEIGHTS, STATE, MANIFEST = "model.safetensors", "state.pt", "checkpoint.json"
CHECKPOINTS = "checkpoints"
LAST = "last"  # symlink to the newest step folder
LAST_WEIGHTS, LAST_STATE = "last.safetensors", "last.state.pt"  # views through ``last``
BEST_WEIGHTS, BEST_RECORD = "best.safetensors", "best.json"
CONFIG_YAML, CONFIG_JSON, METRICS = "config.yaml", "config.json", "metrics.jsonl"
LOGGER_FOLDERS = ("tensorboard", "mlruns", "wandb")  # what the --logger hooks write
_STEP_DIR = re.compile(r"^step-(\d+)$")
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


@dataclass(frozen=True)
class RunLayout:
    """Where each file of the run folder ``root`` lives::

        RUN/config.yaml, config.json      the settings (config.json adds what the run resolved)
        RUN/metrics.jsonl                 one JSON record per log line
        RUN/tensorboard, mlruns, wandb    the --logger folders
        RUN/checkpoints/step-NNNNNN/      one checkpoint: model.safetensors, state.pt,
                                          checkpoint.json (the manifest, written last)
        RUN/checkpoints/last              -> the newest step folder
        RUN/checkpoints/last.safetensors, last.state.pt   -> through ``last``
        RUN/checkpoints/best.safetensors, best.json       the best evaluation so far
    """

    root: Path

    @property
    def checkpoints(self) -> Path:
        return self.root / CHECKPOINTS

    @property
    def config_yaml(self) -> Path:
        return self.root / CONFIG_YAML

    @property
    def config_json(self) -> Path:
        return self.root / CONFIG_JSON

    @property
    def last_weights(self) -> Path:
        return self.checkpoints / LAST_WEIGHTS

    def step_folder(self, step: int) -> Path:
        return step_folder(self.checkpoints, step)

    def previous_run(self) -> list[Path]:
        """What ``--restart`` removes: the checkpoints and every log of the previous run."""
        names = (CHECKPOINTS, METRICS, *LOGGER_FOLDERS)
        return [self.root / name for name in names]


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


def unreadable_error(path: Path, exc: BaseException) -> CheckpointError:
    """The one line for a weights file safetensors cannot read, with the reason."""
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
        raise unreadable_error(path, exc) from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a clusterformer checkpoint (metadata has no "
                              f"'{FORMAT}' tag); pass a file written by cf train")  # fmt: skip
    return meta


def step_folder(ckpt_dir: Path, step: int) -> Path:
    """Where checkpoint ``step`` is once committed."""
    return ckpt_dir / f"step-{step:06d}"


def step_folders(ckpt_dir: Path) -> list[tuple[int, Path]]:
    """``step-*`` folders holding a manifest, newest first (complete by construction)."""
    found = []
    if ckpt_dir.is_dir():
        for p in ckpt_dir.iterdir():
            m = _STEP_DIR.match(p.name)
            if m and not p.is_symlink() and (p / MANIFEST).is_file():
                found.append((int(m.group(1)), p))
    return sorted(found, reverse=True)


def holds_weights(ckpt_dir: Path) -> bool:
    """Whether ``ckpt_dir`` holds any checkpoint weights (complete or not)."""
    if not ckpt_dir.is_dir():
        return False
    return any(p.name.endswith(".safetensors") or (_STEP_DIR.match(p.name) and p.is_dir())
               for p in ckpt_dir.iterdir() if not p.name.startswith("."))  # fmt: skip


def _last_target(ckpt_dir: Path) -> Path | None:
    link = ckpt_dir / LAST
    if link.is_symlink() and (ckpt_dir / os.readlink(link) / WEIGHTS).is_file():
        return ckpt_dir / os.readlink(link) / WEIGHTS
    return None


def resolve_checkpoint(path: str | Path) -> Path:
    """A run folder, its ``checkpoints`` folder, a ``step-*`` folder or a ``.safetensors``
    file -> the weights file (of the newest checkpoint for a folder; ``last.safetensors`` when
    the folder has no step folder, DESIGN's name for a run's weights)."""
    p = Path(path)
    if p.is_dir():
        for ckpt_dir in (p / CHECKPOINTS, p):
            newest = _last_target(ckpt_dir) or next(
                (d / WEIGHTS for _, d in step_folders(ckpt_dir) if (d / WEIGHTS).is_file()), None
            )
            if newest is None and (ckpt_dir / LAST_WEIGHTS).is_file():
                newest = ckpt_dir / LAST_WEIGHTS
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
    return step_folder(ckpt_dir, step) / WEIGHTS
