"""``clusterformer.load(...)`` -> :class:`Predictor`: a trained checkpoint as a Python callable.

The one inference path: ``cf predict`` and ``cf eval --ckpt`` are shells over it. Loading picks
the device, rebuilds the model and task from the checkpoint, builds the slide / TTA plan,
compiles when asked and builds the eval transform from the checkpoint's preprocess record; a
call preprocesses, runs the model (NaN / infinity checked on every raw output), post-processes
and returns typed predictions (:mod:`clusterformer.inference.predictions`).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from clusterformer.data.predict_inputs import collate_inputs, prepare_input
from clusterformer.data.preprocess import EvalPreprocess, eval_transform
from clusterformer.engine import evaluate as evaluation
from clusterformer.engine.evaluate import (
    eval_preprocess,
    load_model_from_checkpoint,
    make_evaluator,
    predict_step,
)
from clusterformer.inference.inputs import decode_input
from clusterformer.inference.predictions import Prediction, make_prediction
from clusterformer.models.backbones import backbone_maps
from clusterformer.tasks import Task
from clusterformer.tasks.tta import InferencePlan, make_plan

AMP_MODES = ("bf16", "fp16", "none")
ON_ERROR = ("raise", "skip")


class SettingError(ValueError):
    """A setting of :func:`load` that cannot work (``cf`` reports it naming the flag: exit 2).

    ``name`` is the keyword (``image_size``); ``str(exc)`` names it so, :meth:`flag_message`
    as the command-line flag (``--image-size``)."""

    exit_code = 2

    def __init__(self, name: str, text: str) -> None:
        self.name, self.text = name, text
        super().__init__(text.replace("{name}", name))

    def flag_message(self) -> str:
        return self.text.replace("{name}", "--" + self.name.replace("_", "-"))


def check_settings(*, amp: str = "none", score_threshold: float = 0.3, max_detections: int = 100,
                   batch_size: int = 8) -> None:  # fmt: skip
    """Refuse settings that cannot work (SettingError), before anything loads."""
    if not 0.0 <= score_threshold <= 1.0:
        raise SettingError("score_threshold", f"{{name}} must be in [0, 1], got {score_threshold}")
    if max_detections < 1:
        raise SettingError("max_detections", f"{{name}} must be >= 1, got {max_detections}")
    if amp not in AMP_MODES:
        raise SettingError("amp", f"{{name}} must be one of {', '.join(AMP_MODES)}, got '{amp}'")
    if batch_size < 1:
        raise SettingError("batch_size", f"{{name}} must be >= 1, got {batch_size}")


def _decode_or_none(image: Any, on_error: str) -> tuple[Tensor, str | None] | None:
    """:func:`decode_input` of ``image``; with ``on_error="skip"`` an unreadable file or image
    gives ``None`` and a warning naming it instead of the error."""
    import warnings

    from clusterformer.data.errors import ImageDecodeError

    try:
        return decode_input(image)
    except (OSError, ImageDecodeError) as exc:
        if on_error != "skip":
            raise
        where = f"{exc.filename}: {exc.strerror}" if isinstance(exc, OSError) and exc.filename else exc
        warnings.warn(f"skipped {where}", UserWarning, stacklevel=3)
        return None


def load(
    checkpoint: str | Path, *, device: str | torch.device | None = None, amp: str = "none",
    compile: bool = False, score_threshold: float = 0.3, max_detections: int = 100,
    image_size: int | None = None, slide: tuple[int, int] | None = None, tta: str | None = None,
    batch_size: int = 8,
) -> Predictor:  # fmt: skip
    """A :class:`Predictor` for a run folder or ``.safetensors`` checkpoint.

    Args:
        device: ``"cpu"``, ``"cuda"``, ``"cuda:N"`` (default: CUDA when available; the same
            default as ``cf predict`` and ``cf eval``).
        amp: mixed precision of the model calls: ``"bf16"``, ``"fp16"`` (CUDA) or ``"none"``.
        compile: ``torch.compile`` the model (inductor, frozen weights); its first call is
            checked against eager (``CompileMismatchError`` when they differ).
        score_threshold, max_detections: detection / instance: keep objects scoring at least
            this, at most this many per image.
        image_size: inference size (default: the checkpoint's training size).
        slide: ``(window, stride)`` sliding-window inference (tasks whose spec has it).
        tta: test-time augmentation, ``"flip"``, ``"0.75,1.25"`` or ``"flip,0.75,1.25"``.
        batch_size: images per model call when a list is predicted.

    Raises:
        SettingError (ValueError): a setting that cannot work; CheckpointError (ValueError):
        an unreadable checkpoint; FileNotFoundError: no checkpoint there.
    """
    from clusterformer.engine.distributed import pick_device

    check_settings(amp=amp, score_threshold=score_threshold, max_detections=max_detections,
                   batch_size=batch_size)  # fmt: skip
    dev = pick_device(str(device) if device is not None else None)
    model, task, meta = load_model_from_checkpoint(checkpoint, dev)
    try:
        plan = make_plan(task.spec, slide, tta)
    except ValueError as exc:  # its messages name the flags: --slide, --tta
        raise SettingError("slide" if "--slide" in str(exc) else "tta", str(exc)) from None
    try:
        preprocess = eval_preprocess(meta, image_size)  # the checkpoint's record
    except ValueError as exc:  # a size beyond the bounds of a preprocess record
        raise SettingError("image_size", f"{{name}} {image_size}: {exc}") from None
    runner: nn.Module = model
    if compile:
        from clusterformer.engine.compiled import checked_inference_compile

        runner = checked_inference_compile(model, amp, f"{task.name} model")
    return Predictor(model, task, meta, checkpoint=Path(checkpoint), device=dev, amp=amp,
                     plan=plan, preprocess=preprocess, runner=runner,
                     score_threshold=score_threshold, max_detections=max_detections,
                     batch_size=batch_size)  # fmt: skip


class Predictor:
    """A loaded checkpoint, ready to predict (build it with :func:`load`).

    ``predictor(image)`` -> one :class:`~clusterformer.inference.predictions.Prediction`;
    ``predictor([image, ...])`` -> a list, one per input, in order (``batch_size`` images per
    model call). An image is a path, a PIL image, a numpy ``(H, W, 3)`` uint8 array or a torch
    ``(3, H, W)`` uint8 / float-in-[0, 1] tensor (:mod:`clusterformer.inference.inputs`).

    Attributes:
        model: the eager model (eval mode, on ``device``, parameters requiring no gradient:
        ``model.requires_grad_(True)`` before training it or taking gradients through it);
        task: the runtime task;
        metadata: the checkpoint's decoded metadata; categories: the task's classes, by train
        id; preprocess: the eval preprocessing record in use; plan: the slide / TTA plan.
    """

    def __init__(self, model: nn.Module, task: Task, metadata: dict[str, Any], *,
                 checkpoint: Path, device: torch.device, amp: str, plan: InferencePlan,
                 preprocess: EvalPreprocess, runner: nn.Module | None = None,
                 score_threshold: float = 0.3, max_detections: int = 100,
                 batch_size: int = 8) -> None:  # fmt: skip
        self.model, self.task, self.metadata = model, task, metadata
        self.checkpoint, self.device, self.amp, self.plan = checkpoint, device, amp, plan
        self.preprocess, self.transform = preprocess, eval_transform(preprocess)
        self.runner = model if runner is None else runner  # the compiled model, when compiled
        self.score_threshold, self.max_detections = score_threshold, max_detections
        self.batch_size = batch_size

    @property
    def categories(self) -> list[dict]:
        return self.task.categories

    def __call__(self, images: Any, *, batch_size: int | None = None,
                 on_error: str = "raise") -> Any:  # fmt: skip
        """Predictions for one image (one :class:`Prediction`) or a list (a list);
        ``batch_size`` (default: :func:`load`'s) images per model call.

        ``on_error``: ``"raise"`` (default) stops at an input that cannot be read or decoded
        (``FileNotFoundError`` / ``OSError``, ``ImageDecodeError``); ``"skip"`` (``cf predict
        --on-error skip``) gives ``None`` in its place and a :class:`UserWarning` naming it,
        so the list stays one entry per input. Inputs of a wrong kind, shape or range (a
        caller's mistake, not a bad file) raise either way."""
        if batch_size is not None:
            check_settings(batch_size=batch_size)
        if on_error not in ON_ERROR:
            raise SettingError("on_error", f"{{name}} must be one of {', '.join(ON_ERROR)}, "
                               f"got '{on_error}'")  # fmt: skip
        single = not isinstance(images, list | tuple)
        items = [images] if single else list(images)
        size = batch_size if batch_size is not None else self.batch_size
        out: list[Prediction | None] = []
        for start in range(0, len(items), size):
            decoded = [_decode_or_none(item, on_error) for item in items[start:start + size]]
            good = [(i, d) for i, d in enumerate(decoded) if d is not None]
            preds = iter(self.predict_batch(self._collate_decoded(good, start))) if good else iter(())
            out.extend(next(preds) if d is not None else None for d in decoded)
        return out[0] if single else out

    def collate(self, images: Iterable[Any], first_index: int = 0) -> dict[str, Any]:
        """Images (any accepted kind) decoded, preprocessed and padded into one batch, the
        form ``cf predict``'s loaders give (:func:`clusterformer.data.predict_inputs.collate_inputs`)."""
        return self._collate_decoded(list(enumerate(decode_input(i) for i in images)), first_index)

    def _collate_decoded(self, decoded: list[tuple[int, tuple[Tensor, str | None]]],
                         first_index: int) -> dict[str, Any]:  # fmt: skip
        """``(position, (raw, source))`` pairs of :func:`decode_input` -> one batch."""
        return collate_inputs([prepare_input(raw, self.transform, source, None, first_index + i)
                               for i, (raw, source) in decoded])  # fmt: skip

    def predict_batch(self, batch: dict[str, Any]) -> list[Prediction]:
        """Typed predictions for a collated batch (``images``, ``pixel_mask``, ``targets``
        and per image ``raw``, ``source``, ``frame``), in its order."""
        if batch.get("errors"):
            raise ValueError(batch["errors"][0])
        outputs = self.run(batch)
        return [make_prediction(pred, self.task, self.score_threshold, self.max_detections,
                                image=batch["source"][i], frame=batch["frame"][i],
                                height=int(batch["raw"][i].shape[1]),
                                width=int(batch["raw"][i].shape[2]))
                for i, pred in enumerate(outputs)]  # fmt: skip

    def run(self, batch: dict[str, Any]) -> Any:
        """The task's post-processed outputs (``task.postprocess``'s form) for a batch.

        Raises:
            FloatingPointError: a raw output holds NaN or infinity (message naming the
            checkpoint and the input).
        """
        inputs = {**batch, "images": batch["images"].to(self.device),
                  "pixel_mask": batch["pixel_mask"].to(self.device)}  # fmt: skip
        sources = [s if s is not None else "an image given in memory" for s in batch["source"]]
        where = sources[0] if len(sources) == 1 else f"a batch from {sources[0]}"
        try:
            with torch.no_grad():
                return predict_step(self.runner, self.task, inputs, plan=self.plan,
                                    device=self.device, amp=self.amp, where=f"on {where}")  # fmt: skip
        except FloatingPointError as exc:
            raise FloatingPointError(f"{self.checkpoint}: {exc}") from None

    def features(self, images: Any) -> list[Tensor]:
        """The backbone's feature maps (the backbone contract's ``forward_pyramid``, timm's
        ``features_only`` convention): a list of NCHW float tensors, one per stage, at strides 4, 8, 16, 32 of
        the preprocessed input, ``(B, C_i, ceil(h / s_i), ceil(w / s_i))``, padding zeroed.

        ``images``: one image or a list of them (as :meth:`__call__` takes; preprocessed by the
        checkpoint's record and padded to a batch), or an already normalised float batch
        ``(B, 3, h, w)``. One image gives ``B = 1``.
        """
        backbone = getattr(self.model, "backbone", self.model)
        if isinstance(images, Tensor) and images.ndim == 4:
            pixels, mask = images, None
        else:
            batch = self.collate(images if isinstance(images, list | tuple) else [images])
            pixels, mask = batch["images"], batch["pixel_mask"]
        from clusterformer.engine.evaluate import autocast

        with torch.no_grad(), autocast(self.amp, self.device):
            maps, _ = backbone_maps(backbone, pixels.to(self.device),
                              None if mask is None else mask.to(self.device))  # fmt: skip
        return [m.float().contiguous() for m in maps]

    def for_categories(self, categories: list[dict]) -> Predictor:
        """This predictor with its task rebuilt for ``categories`` (a dataset's own ids and
        thing / stuff split, as ``cf eval`` scores against); the model is shared."""
        clone = object.__new__(Predictor)
        clone.__dict__.update(self.__dict__)
        clone.task = self.task.spec.build(categories, self.task.options)
        return clone

    def evaluate(self, batches: Iterable[dict[str, Any]], *, predictions_out: Path | None = None,
                 per_class: bool = False, progress: Iterator | None = None) -> tuple[dict, Any]:  # fmt: skip
        """The task's metrics over loader ``batches`` (and the evaluator that computed them):
        ``cf eval --ckpt``. Raises FloatingPointError naming the checkpoint on NaN outputs,
        NoPerClassMetrics for ``per_class`` on a task without them."""
        evaluator = make_evaluator(self.task, predictions_out, per_class)
        try:
            # Through the module: tests stand in for the loop by replacing its attribute.
            metrics = evaluation.evaluate(self.runner, self.task, batches, device=self.device,
                                          amp=self.amp, evaluator=evaluator,
                                          predictions_out=predictions_out, progress=progress,
                                          plan=self.plan)  # fmt: skip
        except FloatingPointError as exc:  # a diverged checkpoint: name it
            raise FloatingPointError(f"{self.checkpoint}: {exc}") from None
        return metrics, evaluator
