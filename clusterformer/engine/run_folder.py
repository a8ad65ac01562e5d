"""What a run folder must hold to start, resume or restart training, checked before step 1
(its layout: :class:`~clusterformer.engine.checkpoint.RunLayout`).

* A fresh start needs a folder without checkpoint weights (else ``--resume``, ``--restart`` or
  another ``--out``).
* ``--resume`` continues the newest complete checkpoint, or stops with one line saying why: it
  never starts over on a folder that holds weights. An empty folder starts at step 0.
* The checkpoint must come from the same task, preset, image size, classes and model options;
  a change is one line naming both values.
* ``--restart`` deletes the folder's checkpoints and logs (once everything else is checked),
  then starts at step 0.
* The folder must be writable and have room for one more checkpoint (the previous one stays
  until the new one is committed).
* Temporaries that a killed writer left behind are removed first.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from clusterformer.engine import checkpoint as ckpt
from clusterformer.engine import files


class RunFolderError(ValueError):
    """The run folder does not allow what was asked (start, resume); the message says why."""


@dataclass
class Resumable:
    weights: Path
    state: dict[str, Any]
    meta: dict[str, Any]


def tidy(run_dir: Path) -> list[str]:
    """Main rank, before anything reads the folder: remove dead writers' temporaries and point
    ``last`` at the newest checkpoint. Returns lines to log."""
    removed = files.remove_dead_temps(run_dir) + ckpt.recover(ckpt.RunLayout(run_dir).checkpoints)
    if not removed:
        return []
    return [f"removed {len(removed)} temporary file(s) an interrupted save left in {run_dir}"]


def restart(run_dir: Path) -> list[str]:
    """Main rank, once everything else is checked (just before step 1, so a mistake in the
    flags or the data loses nothing): delete the previous run's checkpoints and logs."""
    old = [p for p in ckpt.RunLayout(run_dir).previous_run() if p.exists()]
    tag = files.temp_tag()
    for p in old:  # renamed away first: a kill mid-delete leaves no half checkpoint behind
        trash = run_dir / f".{p.name}.tmp-{tag}"
        files.rename(p, trash)
        files.remove_tree(trash)
    if not old:
        return []
    return [f"--restart: removed the previous run's {', '.join(p.name for p in old)} from "
            f"{run_dir}"]  # fmt: skip


def resumable(
    run_dir: Path, *, resume: bool, restart: bool, notes: list[str]
) -> Resumable | None:
    """The checkpoint to continue, None to start at step 0, or RunFolderError."""
    ckpt_dir = ckpt.RunLayout(run_dir).checkpoints
    if resume and restart:
        raise RunFolderError("--resume and --restart exclude each other; give one")
    if restart:
        return None
    if not resume:
        if ckpt.holds_weights(ckpt_dir):
            raise RunFolderError(f"{run_dir} already holds a checkpoint; pass --resume to "
                                 "continue it, --restart to start over, or choose another "
                                 "--out")  # fmt: skip
        return None
    found = ckpt.find_resumable(ckpt_dir, notes)
    if found is None:
        notes.append(f"--resume: no checkpoint in {ckpt_dir} yet; starting at step 0")
        return None
    weights, state = found
    return Resumable(weights, state, ckpt.read_metadata(weights))


def check_same_setup(found: Resumable, *, task: str, model: str, image_size: int,
                     num_classes: int) -> None:  # fmt: skip
    """Stop when the run would resume with another task, preset, image size or class count."""
    meta = found.meta
    for what, before, now in (
        ("--task", meta.get("task"), task),
        ("--model", meta.get("model_name"), model),
        ("--image-size", meta.get("image_size"), image_size),
        ("classes in --data:", meta.get("num_classes"), num_classes),
    ):
        if before is not None and before != now:
            raise RunFolderError(
                f"{found.weights}: trained with {what} {before}, now {now}; resume with the "
                "same setting, or --restart / another --out to start over"
            )


def check_same_model(found: Resumable, module: nn.Module) -> None:
    """Stop when the model built now differs from the checkpoint's (options such as
    --head-pool or num_queries): one line naming the first differing option."""
    saved = found.meta.get("model_config") or {}
    built = getattr(module, "model_config", None) or {}
    for key in sorted(set(saved) | set(built)):
        if saved.get(key) != built.get(key):
            raise RunFolderError(
                f"{found.weights}: trained with model option {key}={saved.get(key)!r}, now "
                f"{built.get(key)!r}; resume with the same options or --restart"
            )


def checkpoint_bytes(module: nn.Module, ema: bool) -> int:
    """About how many bytes one checkpoint of ``module`` takes: the weights, AdamW's two
    moments per trained parameter and, with EMA, the training weights again."""
    weights = sum(t.numel() * t.element_size() for t in module.state_dict().values())
    trained = sum(p.numel() * p.element_size() for p in module.parameters() if p.requires_grad)
    return weights + 2 * trained + (weights if ema else 0) + files.MIB


def check_room(run_dir: Path, module: nn.Module, ema: bool) -> None:
    """Before step 1: the run folder is writable and has room for a checkpoint."""
    need = checkpoint_bytes(module, ema)
    files.check_writable(ckpt.RunLayout(run_dir).checkpoints, need + need // 10, "a checkpoint")
