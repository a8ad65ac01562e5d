"""The options ``cf eval``, ``cf predict`` and ``cf benchmark`` share, defined once as
``Annotated`` types (each command gives the default in its signature), and the one place a
library setting error becomes a usage error naming the flag."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from clusterformer.cli.errors import UserError

Device = Annotated[str | None, typer.Option(
    "--device", help="cpu, cuda or cuda:N; unset: CUDA when available.")]
Amp = Annotated[str, typer.Option(
    "--amp", help="Mixed precision for inference: bf16, fp16 (CUDA) or none.")]
Compile = Annotated[bool, typer.Option(
    "--compile/--no-compile",
    help="torch.compile the model (inductor with frozen weights); the first batch is checked "
    "against eager and a difference stops the run.")]
BatchSize = Annotated[int, typer.Option("--batch-size", help="Images per model call (cf predict: a video's frames count as images).")]
ImageSize = Annotated[int | None, typer.Option(
    "--image-size",
    help="Inference size (default: the checkpoint's training size; the checkpoint's resize and "
    "crop scaled to it); with --slide, set it above the training size.")]
Slide = Annotated[tuple[int, int] | None, typer.Option(
    "--slide", metavar="WINDOW STRIDE",
    help="Sliding-window inference, for the tasks whose spec has it (a task without it names "
    "those that do): windows of WINDOW px every STRIDE px over the image at --image-size, "
    "scores averaged where windows overlap (mmsegmentation's).")]
Tta = Annotated[str | None, typer.Option(
    "--tta",
    help="Test-time augmentation: 'flip', scales such as '0.75,1.25', or both "
    "('flip,0.75,1.25'); the plain pass is always one of the views. Each task merges its "
    "views: class probabilities (per image or per pixel) averaged, boxes pooled then "
    "class-aware NMS at IoU 0.5 (README: Prediction at scale).")]
ScoreThreshold = Annotated[float, typer.Option(
    "--score-threshold", help="Detection / instance: keep objects scoring at least this (0-1).")]
MaxDetections = Annotated[int, typer.Option(
    "--max-detections", "--max-dets", help="Detection / instance: at most this many objects per image.")]


class OnError(str, Enum):
    """``--on-error``: what a bad input (sample, image) does to the command."""

    stop = "stop"
    skip = "skip"


Checkpoint = Annotated[Path, typer.Option("--ckpt", help="A run folder or a .safetensors checkpoint.")]


@contextlib.contextmanager
def flag_errors() -> Iterator[None]:
    """A :class:`clusterformer.inference.SettingError` raised inside (a setting that cannot
    work) becomes a usage error (exit 2) naming the command-line flag."""
    from clusterformer.inference import SettingError

    try:
        yield
    except SettingError as exc:
        raise UserError(exc.flag_message()) from None
