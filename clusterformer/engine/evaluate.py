"""Evaluation: run a model over a loader through its Task, and rebuild models from checkpoints."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from clusterformer.data.preprocess import EvalPreprocess, default_eval_preprocess
from clusterformer.engine.checkpoint import (
    CheckpointError,
    check_finite,
    load_weights,
    read_metadata,
    resolve_checkpoint,
)
from clusterformer.engine.finite import describe_output, non_finite_output
from clusterformer.tasks import Task, task_spec
from clusterformer.tasks.tta import InferencePlan, predict_batch


def to_device(obj: Any, device: torch.device) -> Any:
    """Move every tensor inside nested dicts / lists / tuples to ``device`` (new containers)."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, Mapping):
        return {k: to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(to_device(v, device) for v in obj)
    return obj


def autocast(amp: str, device: torch.device) -> contextlib.AbstractContextManager:
    """The autocast context for ``amp`` in {"bf16", "fp16", "none"} on ``device``."""
    if amp == "none":
        return contextlib.nullcontext()
    if amp == "fp16" and device.type != "cuda":
        raise ValueError(
            "--amp fp16 needs a CUDA device (it trains with a gradient scaler); "
            "use --amp bf16 or --amp none on CPU"
        )
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    task: Task,
    batches: Iterable[dict[str, Any]],
    *,
    device: torch.device,
    amp: str = "none",
    predictions_out: str | Path | None = None,
    progress: Iterator | None = None,
    per_class: bool = False,
    evaluator: Any = None,
    plan: InferencePlan | None = None,
) -> dict[str, float]:
    """Task metrics of ``model`` over ``batches`` (this rank's share; reduced across ranks).

    Args:
        batches: loader batches (``images`` (B, 3, H, W), ``pixel_mask`` (B, H, W), targets)
            of a dataset with the task's categories.
        predictions_out: where the evaluator also writes the predictions (the task spec's
            ``prediction_suffix`` says what it writes).
        per_class: also the per-class keys ``<metric>/<class name>``
            (:func:`clusterformer.metrics.per_class.split_per_class`).
        evaluator: the evaluator to fill (default: the task's, see :func:`make_evaluator`);
            the caller keeps it to read more than the metrics (a confusion matrix).
        plan: sliding-window inference and / or TTA (:mod:`clusterformer.tasks.tta`);
            None or an inactive plan is one plain pass per batch.
    """
    was_training = model.training
    model.eval()
    if evaluator is None:
        evaluator = make_evaluator(task, predictions_out, per_class)
    try:
        for batch in batches:
            batch = to_device(batch, device)
            keys = batch.get("keys") or ["?"]
            predictions = predict_step(model, task, batch, plan=plan, device=device, amp=amp,
                                       where=f"(batch with sample {keys[0]})")  # fmt: skip
            evaluator.update(predictions, batch)
            if progress is not None:
                next(progress, None)
    finally:
        model.train(was_training)
    return evaluator.compute()


class NoPerClassMetrics(ValueError):
    """Per-class metrics were asked of a task whose evaluator has none."""


def make_evaluator(task: Task, predictions_out: str | Path | None, per_class: bool) -> Any:
    """``task.evaluator``; ``per_class`` is passed only when asked, so a plugin task without
    per-class metrics keeps working (and says so when they are asked for)."""
    if not per_class:
        return task.evaluator(predictions_out)
    try:
        return task.evaluator(predictions_out, per_class=True)
    except TypeError as exc:
        if "per_class" not in str(exc):
            raise
        raise NoPerClassMetrics(f"the {task.name} task reports no per-class metrics") from None


def check_finite_outputs(outputs: Any, where: str) -> None:
    """Raise FloatingPointError when a raw model output holds NaN or infinity: such scores
    would be ranked, drawn and written as if real. ``where`` names the input, e.g. ``on
    photo.jpg`` or ``(batch with sample KEY)``."""
    bad = non_finite_output(outputs)
    if bad is not None:
        raise FloatingPointError(f"model {describe_output(bad)} is NaN or infinite {where}: the "
                                 "weights are unusable; use an earlier checkpoint")  # fmt: skip


def predict_step(
    model: nn.Module, task: Task, batch: dict[str, Any], *, plan: InferencePlan | None = None,
    device: torch.device, amp: str = "none", where: str = "",
) -> Any:  # fmt: skip
    """The task's post-processed predictions for one batch already on ``device``: the model
    under ``amp``'s autocast (one pass, or every view of an active ``plan``), every raw output
    checked by :func:`check_finite_outputs`, then ``task.postprocess`` or the plan's merge.
    The one inference step of ``cf eval``, ``cf predict``, evaluation during training and
    :mod:`clusterformer.inference`."""
    return predict_batch(task, model, batch, plan,
                         check=lambda outputs: check_finite_outputs(outputs, where),
                         context=lambda: autocast(amp, device))  # fmt: skip


def normalisation_of(module: nn.Module) -> dict[str, list[float]]:
    """The ``{"mean", "std"}`` a model's inputs are normalised with (its ``default_cfg``)."""
    cfg = getattr(module, "default_cfg", None) or {}
    if "mean" not in cfg or "std" not in cfg:
        raise ValueError(f"{type(module).__name__} has no mean/std in its default_cfg")
    return {"mean": [float(v) for v in cfg["mean"]], "std": [float(v) for v in cfg["std"]]}


def checkpoint_metadata(
    module: nn.Module, task: Task, *, image_size: int, extra: dict[str, Any] | None = None,
    preprocess: EvalPreprocess | None = None,
) -> dict[str, Any]:
    """What ``cf eval`` / ``cf predict`` / ``cf export`` need to rebuild and run the model from
    weights alone: its config, the task with its options and categories, the input size, the
    normalisation and the evaluation preprocessing record (``preprocess``: the one record every
    later reader builds its eval transform from; default: the task's default for
    ``image_size``)."""
    model_config = getattr(module, "model_config", None)
    if model_config is None:
        raise ValueError(f"{type(module).__name__} has no model_config; cannot checkpoint it")
    norm = normalisation_of(module)
    if preprocess is None:
        preprocess = default_eval_preprocess(task.spec.data.transform, image_size, **norm)
    return {
        "model_config": model_config,
        "task": task.name,
        "task_config": task.config(),
        "categories": task.categories,
        "image_size": image_size,
        "normalisation": norm,
        "preprocess": preprocess.to_dict(),
        **(extra or {}),
    }


def load_model_from_checkpoint(
    path: str | Path, device: torch.device | str = "cpu"
) -> tuple[nn.Module, Task, dict[str, Any]]:
    """Rebuild the model and task stored in a checkpoint (run folder or ``.safetensors``).

    Returns:
        (model in eval mode on ``device`` with parameters that require no gradient, the task
        built with the checkpoint's categories and options, decoded metadata). An inference
        model: oneDNN then keeps its linears' weights packed (``ops.fused_linear``); call
        ``model.requires_grad_(True)`` to train it. The metadata's ``normalisation`` is the checkpoint's (for a
        checkpoint written before it was stored: the model's own default), and so is its
        ``preprocess`` record (older checkpoints: the task's default for their image size and
        normalisation, i.e. what they were always evaluated with).
    Raises:
        CheckpointError (ValueError): unreadable, not fitting, or NaN / infinite weights.
    """
    from clusterformer.models import create_model

    weights = resolve_checkpoint(path)
    meta = read_metadata(weights)
    for key in ("model_config", "task"):
        if key not in meta:
            raise ValueError(f"{weights}: checkpoint metadata lacks '{key}'")
    spec = task_spec(meta["task"])
    model = create_model(**meta["model_config"])
    load_weights(model, weights)
    check_finite(model, weights)
    known = spec.option_fields()
    options = {k: v for k, v in (meta.get("task_config") or {}).items() if k in known}
    task = spec.build(meta.get("categories") or int(meta["model_config"].get("num_classes", 0)),
                      options)  # fmt: skip
    meta["normalisation"] = meta.get("normalisation") or normalisation_of(model)
    try:  # a damaged record fails here, naming the file, not per image
        if not meta.get("preprocess"):
            meta["preprocess"] = default_eval_preprocess(
                spec.data.transform, int(meta.get("image_size") or 224),
                **meta["normalisation"]).to_dict()
        EvalPreprocess.from_dict(meta["preprocess"])
    except (ValueError, TypeError) as exc:
        raise CheckpointError(f"{weights}: unusable preprocess record ({exc}); re-save the "
                              "checkpoint with cf train") from None
    return model.to(device).eval().requires_grad_(False), task, meta


def eval_preprocess(meta: dict[str, Any], image_size: int | None = None) -> EvalPreprocess:
    """The evaluation preprocessing of a loaded checkpoint's metadata (see
    :func:`load_model_from_checkpoint`), at ``image_size`` when one is asked for (the same
    rule, every side scaled)."""
    record = EvalPreprocess.from_dict(meta["preprocess"])
    return record.at_size(image_size) if image_size else record
