"""``cf eval``: score a checkpoint on a dataset, or score saved predictions without a model."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import typer

from clusterformer.cli.errors import DataError, UserError
from clusterformer.cli.options import (
    Amp,
    BatchSize,
    Compile,
    Device,
    ImageSize,
    Slide,
    Tta,
    flag_errors,
)


def register(app: typer.Typer) -> None:
    app.command("eval")(eval_command)


def eval_command(
    data: Annotated[Path, typer.Option("--data", help="Evaluation data: a shard folder (dataset.json) or a raw dataset folder.")],
    ckpt: Annotated[Path | None, typer.Option("--ckpt", help="A run folder or a .safetensors checkpoint to evaluate.")] = None,
    task: Annotated[str | None, typer.Option("--task", help="With --predictions: the task of the predictions.")] = None,
    predictions: Annotated[Path | None, typer.Option("--predictions", help="Score this prediction file instead of a model (classification: JSON of image key -> class id, or key -> list of class ids best first; detection/instance: COCO results JSON, instance with RLE masks; panoptic: COCO panoptic JSON with its PNG folder beside it named as the JSON without .json; semantic: a folder of label PNGs named by image stem in the dataset's own label values).")] = None,
    out: Annotated[Path | None, typer.Option("--out", help="Write the metrics as JSON here.")] = None,
    batch_size: BatchSize = 32,
    image_size: ImageSize = None,
    device: Device = None,
    amp: Amp = "none",
    num_workers: Annotated[int, typer.Option("--num-workers", help="Data loading worker processes.")] = 0,
    compile_model: Compile = False,
    per_class: Annotated[bool, typer.Option("--per-class/--no-per-class", help="Also each class's metrics (AP / PQ, SQ, RQ / IoU, Acc / accuracy) and, for boxes and masks, AP small/medium/large and AR@100: printed as a table and written under \"per_class\" in the --out JSON (without --out, a checkpoint's run folder gets per_class.json).")] = False,
    show_empty: Annotated[bool, typer.Option("--show-empty", help="With --per-class: also list the classes with nothing to score (n/a in every column: no ground truth and no prediction), which the table leaves out by default, saying how many; the JSON always has every class.")] = False,
    plots: Annotated[bool, typer.Option("--plots", help="Also draw PNGs (the plot extra: matplotlib): confusion_matrix.png (with class names) and confused_pairs.png (the most confused true -> predicted pairs) when the task's evaluator keeps a confusion matrix, per_class_<metric>.png bar charts; next to --out as NAME.<plot>.png, else in ./plots/.")] = False,
    plots_dir: Annotated[Path | None, typer.Option("--plots-dir", help="Draw the --plots PNGs into this folder instead.")] = None,
    slide: Slide = None,
    tta: Tta = None,
) -> None:
    """Evaluate a checkpoint (--ckpt) or a prediction file (--task T --predictions PATH) on --data.

    Prints a table and, with --out, writes JSON with the task's metrics (classification:
    top1, top5 in percent, top5 being top-min(5, C) for fewer than 5 classes, left out of
    the table below 6 classes, where every image's class is among the top 5; detection:
    bbox_AP, bbox_AP50, bbox_AP75 by COCOeval; instance segm_AP* + bbox_AP*; semantic mIoU,
    aAcc; panoptic PQ, SQ, RQ, PQ_th, PQ_st) and the predictions beside the metrics,
    re-scorable with --predictions (NAME.detections.json, NAME.segm.json, PNG folder
    NAME.semantic/, or NAME.panoptic.json + NAME.panoptic/). Rates are percent (0-100).
    Every file written is listed.

    A semantic model that puts 95 % or more of the counted pixels of 2 or more images in one
    class, or a classifier that gives 95 % or more of 10 or more images one class, is warned
    about in one line (a model collapsed to one class), unless the ground truth is itself
    that one-sided.
    """
    if (ckpt is None) == (predictions is None):
        raise UserError("give exactly one of --ckpt (evaluate a model) or --predictions (score a file)")
    if not data.exists():
        raise FileNotFoundError(f"{data}: evaluation data not found")
    if batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {batch_size}")
    from clusterformer.cli.plots import plots_target
    from clusterformer.data.output_lock import hold_output

    target = plots_target(plots, plots_dir, out)  # checks matplotlib before a long run
    # The bar charts draw the per-class metrics: --plots computes them (printed and
    # written only with --per-class).
    classes = per_class or target is not None
    # --out and the predictions named after it (NAME.semantic/, NAME.panoptic/): one writer
    guard = (hold_output(out, "cf eval", is_file=True) if out is not None
             else contextlib.nullcontext())  # fmt: skip
    with guard:
        if predictions is not None:
            if slide is not None or tta is not None:
                raise UserError("--slide and --tta run a model: use them with --ckpt, not --predictions")
            metrics = _score_predictions(task, predictions, data, num_workers, classes)
            task_name, evaluator, written = str(task), None, None
            title = f"{task} predictions {predictions} on {data}"
        else:
            predictor = _load(ckpt, device=device, amp=amp, compile=compile_model,
                              image_size=image_size, slide=slide, tta=tta, batch_size=batch_size)
            metrics, evaluator = evaluate_checkpoint(predictor, data, num_workers=num_workers,
                                                     task_flag=task, out=out, per_class=classes,
                                                     tta=tta)  # fmt: skip
            task_name, written = metrics.pop("_task"), metrics.pop("_predictions")
            title = f"{task_name} checkpoint {ckpt} on {data}"
        report(title, metrics, out=out, per_class=per_class, run_folder=_run_folder(ckpt),
               show_empty=show_empty, num_classes=_class_count(task_name, data, evaluator))
        list_written(written)
        warn_if_collapsed(task_name, evaluator)
        if target is not None:  # after the table, so the last line says where the plots are
            _write_plots(target, metrics, evaluator)


def _load(ckpt: Path, **settings: Any) -> Any:
    """:func:`clusterformer.load` for ``--ckpt`` on the device announced first; a setting that
    cannot work names its flag (exit 2)."""
    from clusterformer.cli.runtime_opts import start_compute
    from clusterformer.inference import load

    start_compute(settings.get("device"))
    with flag_errors():
        return load(ckpt, **settings)


def evaluate_checkpoint(
    predictor: Any, data: Path, *, num_workers: int = 0, task_flag: str | None = None,
    out: Path | None = None, per_class: bool = False, tta: str | None = None,
) -> tuple[dict[str, Any], Any]:  # fmt: skip
    """A loaded checkpoint's metrics on ``data`` (with ``_task``, its task name, and
    ``_predictions``, where the predictions were written or None) and the
    evaluator that computed them (its confusion matrix feeds ``--plots``). ``predictor`` is a
    :class:`clusterformer.inference.Predictor` (the model side: device, plan, compile,
    preprocess, the NaN check); ``tta`` is ``--tta`` as given, recorded with the metrics."""
    from clusterformer.cli.progress import progress_bar
    from clusterformer.data import LoaderSpec, build_loader, load_dataset_info
    from clusterformer.engine.evaluate import NoPerClassMetrics

    ckpt = predictor.checkpoint
    task = predictor.task
    if task_flag is not None and task_flag != task.name:
        raise UserError(f"--task {task_flag} does not match the checkpoint's task '{task.name}'")
    predictions_out = None
    if task.spec.prediction_suffix is not None and out is not None:
        from clusterformer.metrics.seg_common import predictions_path_for

        # The predictions go next to the metrics, so they can be re-scored or inspected.
        predictions_out = predictions_path_for(out, task.spec.prediction_suffix)
    info = load_dataset_info(str(data), task.name)
    data_categories = task.spec.categories(info.get("categories") or [])
    _check_categories(predictor.metadata.get("categories") or [], data_categories, ckpt, data)
    if data_categories:  # scored against the dataset's own ids (and thing / stuff split)
        predictor = predictor.for_categories(data_categories)
    size = predictor.preprocess.size
    spec = LoaderSpec(batch_size=predictor.batch_size, image_size=size, train=False, num_workers=num_workers,
                      rank=0, world_size=1, preprocess=predictor.preprocess)  # fmt: skip
    loader = build_loader(str(data), task.name, spec)
    with progress_bar("eval", len(loader)) as advance:
        try:
            metrics, evaluator = predictor.evaluate(loader, predictions_out=predictions_out,
                                                    per_class=per_class, progress=_ticks(advance))  # fmt: skip
        except NoPerClassMetrics as exc:  # a plugin task without per-class metrics
            raise UserError(f"--per-class: {exc}") from None
    plan = predictor.plan
    plan_keys = {"slide": list(plan.slide) if plan.slide else None,
                 "tta": tta} if plan.active else {}  # fmt: skip
    summary = {**metrics, "step": predictor.metadata.get("step"), "image_size": size, **plan_keys,
               "_task": task.name, "_predictions": predictions_out}  # fmt: skip
    return summary, evaluator


def _ticks(advance: Any) -> Iterator[None]:
    """The progress iterator ``evaluate`` advances once per batch."""
    while True:
        advance()
        yield None


def _check_categories(trained: list[dict], data_cats: list[dict], ckpt: Path, data: Path) -> None:
    names_trained = [c.get("name") for c in trained]
    names_data = [c.get("name") for c in data_cats]
    if not names_trained or names_trained == names_data:
        return
    if len(names_trained) != len(names_data):
        differ = f"has {len(names_data)} classes, the checkpoint {len(names_trained)}"
    else:
        pairs = enumerate(zip(names_data, names_trained, strict=True))
        i = next(i for i, (a, b) in pairs if a != b)
        differ = (f"names class {i} {str(names_data[i])[:40]!r}, the checkpoint "
                  f"{str(names_trained[i])[:40]!r}")  # fmt: skip
    raise DataError(f"{data}: {differ} ({ckpt}); evaluate on data with the checkpoint's classes")


def _score_predictions(
    task: str | None, predictions: Path, data: Path, num_workers: int, per_class: bool = False
) -> dict[str, Any]:
    from clusterformer.tasks import task_spec

    if task is None:
        raise UserError("--predictions needs --task")
    try:
        spec = task_spec(task)
    except ValueError as exc:
        raise UserError(f"--task: {exc}") from None
    if spec.score_file is None:
        raise UserError(f"the {task} task has no prediction file format to score; evaluate a "
                        "checkpoint with --ckpt")  # fmt: skip
    if not per_class:
        return spec.score_file(predictions, data, task=spec.name, num_workers=num_workers)
    try:
        return spec.score_file(predictions, data, task=spec.name, num_workers=num_workers,
                               per_class=True)  # fmt: skip
    except TypeError as exc:  # a plugin's score_file without the argument
        if "per_class" not in str(exc):
            raise
        raise UserError(f"--per-class: the {task} task reports no per-class metrics") from None


def _run_folder(ckpt: Path | None) -> Path | None:
    """The run folder of ``--ckpt`` (given as a run folder), where ``per_class.json`` goes
    without ``--out``; ``None`` for a bare checkpoint file or no checkpoint."""
    return ckpt if ckpt is not None and ckpt.is_dir() else None


def report(title: str, metrics: dict[str, Any], *, out: Path | None, per_class: bool,
           run_folder: Path | None = None, show_empty: bool = False,
           num_classes: int | None = None) -> dict[str, Any]:  # fmt: skip
    """Print the metric table (and the per-class table: ``show_empty`` lists classes with
    nothing to score too), write ``--out``; returns what was written: the summary metrics, with
    ``per_class`` (class name -> metrics) when asked. ``num_classes``: a classifier's class
    count (top-k rows for k >= it are left out of the table, kept in the JSON)."""
    from rich.console import Console

    from clusterformer.cli.metric_table import per_class_table, summary_table
    from clusterformer.engine.files import atomic_write_json
    from clusterformer.metrics.per_class import split_per_class

    summary, classes = split_per_class(metrics)
    console = Console()
    console.print(title, soft_wrap=True)
    console.print(summary_table(summary, num_classes=num_classes))
    document: dict[str, Any] = dict(summary)
    if per_class:
        console.print(per_class_table(classes, show_empty=show_empty))
        document["per_class"] = classes
    if out is not None:
        atomic_write_json(out, document)
        typer.echo(f"wrote {out}")
    elif per_class and run_folder is not None:
        atomic_write_json(run_folder / "per_class.json", document)
        typer.echo(f"wrote {run_folder / 'per_class.json'}")
    return document


def _class_count(task: str, data: Path, evaluator: Any) -> int | None:
    """A classifier's number of classes (the table's top-k rows depend on it), else None."""
    if task != "classification":
        return None
    confusion = getattr(evaluator, "confusion_matrix", None)
    if confusion is not None:
        return len(confusion()[1])
    from clusterformer.data import load_dataset_info

    return len(load_dataset_info(str(data), task).get("categories") or []) or None


def list_written(predictions: Path | None) -> None:
    """Say where the predictions beside ``--out`` went, as ``wrote ...`` lines: the file, the
    PNG folder (with its count), or both (panoptic: NAME.panoptic.json + NAME.panoptic/);
    nothing for None (no --out: no predictions written)."""
    if predictions is None:
        return
    folder = predictions.with_suffix("") if predictions.suffix == ".json" else predictions
    if predictions.is_file():
        typer.echo(f"wrote {predictions}")
    if folder.is_dir():
        count = sum(1 for p in folder.iterdir() if p.suffix == ".png")
        typer.echo(f"wrote {count} prediction PNG(s) to {folder}/")


def warn_if_collapsed(task: str, evaluator: Any) -> None:
    """One warning line on stderr when the model's predictions collapsed to one class
    (:func:`clusterformer.inference.collapse.collapse_warning`, with the ground truth)."""
    import sys

    from clusterformer.inference.collapse import COLLAPSE_UNITS, collapse_warning

    unit = COLLAPSE_UNITS.get(task)
    confusion = getattr(evaluator, "confusion_matrix", None)
    if unit is None or confusion is None:
        return
    matrix, names = confusion()  # rows the truth, columns the predictions
    images = int(matrix.sum()) if unit == "images" else int(getattr(evaluator, "num_images", 0))
    warning = collapse_warning(matrix.sum(0), names, images, unit, truth=matrix.sum(1))
    if warning is not None:
        print(warning, file=sys.stderr, flush=True)


def _write_plots(target: tuple[Path, str], metrics: dict[str, Any], evaluator: Any) -> None:
    from clusterformer.cli.plots import write_eval_plots

    written = write_eval_plots(*target, metrics, evaluator)
    typer.echo(f"wrote {len(written)} plot(s) to {target[0]}: "
               f"{', '.join(p.name for p in written)}" if written else "--plots: nothing to "
               "draw (no confusion matrix or per-class metric for this task)")  # fmt: skip
