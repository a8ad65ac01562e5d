"""``cf eval``: score a checkpoint on a dataset, or score saved predictions without a model."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import typer

from clusterformer.cli.errors import DataError, UserError


def register(app: typer.Typer) -> None:
    @app.command("eval")
    def eval_command(
        data: Path = typer.Option(
            ...,
            "--data",
            help="Evaluation data: a shard folder (dataset.json) or a raw dataset folder.",
        ),
        ckpt: Path | None = typer.Option(
            None, "--ckpt", help="A run folder or a .safetensors checkpoint to evaluate."
        ),
        task: str | None = typer.Option(
            None, "--task", help="With --predictions: the task of the predictions."
        ),
        predictions: Path | None = typer.Option(
            None,
            "--predictions",
            help="Score this prediction file instead of a model (classification: JSON of image key -> class id, or key -> list of class ids best first; detection/instance: COCO results JSON, instance with RLE masks; panoptic: COCO panoptic JSON with its PNG folder beside it named as the JSON without .json; semantic: a folder of label PNGs named by image stem in the dataset's own label values).",
        ),
        out: Path | None = typer.Option(None, "--out", help="Write the metrics as JSON here."),
        batch_size: int = typer.Option(32, "--batch-size", help="Images per batch."),
        image_size: int | None = typer.Option(
            None,
            "--image-size",
            help="Evaluation crop size (default: the checkpoint's training size).",
        ),
        device: str | None = typer.Option(
            None, "--device", help="cpu, cuda or cuda:N (default: CUDA when available)."
        ),
        amp: str = typer.Option(
            "none", "--amp", help="Mixed precision for inference: bf16, fp16 (CUDA) or none."
        ),
        num_workers: int = typer.Option(0, "--num-workers", help="Data loading worker processes."),
        compile_model: bool = typer.Option(
            False, "--compile/--no-compile",
            help="torch.compile the model (inductor with frozen weights); the first batch is "
            "checked against eager and a difference stops the run.",
        ),
        per_class: bool = typer.Option(
            False, "--per-class/--no-per-class",
            help="Also each class's metrics (AP / PQ, SQ, RQ / IoU, Acc / accuracy) and, for "
            "boxes and masks, AP small/medium/large and AR@100: printed as a table and written "
            "under \"per_class\" in the --out JSON (without --out, a checkpoint's run folder "
            "gets per_class.json).",
        ),
        plots: bool = typer.Option(
            False, "--plots", help="Also draw PNGs (the plot extra: matplotlib): "
            "confusion_matrix.png when the task's evaluator keeps one, per_class_<metric>.png "
            "bar charts; next to --out as NAME.<plot>.png, else in ./plots/.",
        ),
        plots_dir: Path | None = typer.Option(
            None, "--plots-dir", help="Draw the --plots PNGs into this folder instead.",
        ),
        slide: tuple[int, int] | None = typer.Option(
            None, "--slide", metavar="WINDOW STRIDE",
            help="Sliding-window inference, as cf predict --slide (for the tasks whose spec has it): "
            "windows of WINDOW px every STRIDE px over each image at --image-size.",
        ),
        tta: str | None = typer.Option(
            None, "--tta",
            help="Test-time augmentation as cf predict --tta: 'flip', scales '0.75,1.25' or both.",
        ),
    ) -> None:
        """Evaluate a checkpoint (--ckpt) or a prediction file (--task T --predictions PATH) on --data.

        Prints a table and, with --out, writes JSON with the task's metrics (classification:
        top1, top5 in percent, top5 being top-min(5, C) for fewer than 5 classes; detection:
        bbox_AP, bbox_AP50, bbox_AP75 by COCOeval; instance segm_AP* + bbox_AP*; semantic mIoU,
        aAcc; panoptic PQ, SQ, RQ, PQ_th, PQ_st) and the predictions beside the metrics,
        re-scorable with --predictions (NAME.detections.json, NAME.segm.json, PNG folder
        NAME.semantic/, or NAME.panoptic.json + NAME.panoptic/). Rates are percent (0-100).
        """
        if (ckpt is None) == (predictions is None):
            raise UserError(
                "give exactly one of --ckpt (evaluate a model) or --predictions (score a file)"
            )
        if not data.exists():
            raise FileNotFoundError(f"{data}: evaluation data not found")
        if batch_size < 1:
            raise UserError(f"--batch-size must be >= 1, got {batch_size}")
        from clusterformer.cli.plots import plots_target

        target = plots_target(plots, plots_dir, out)  # checks matplotlib before a long run
        # The bar charts draw the per-class metrics: --plots computes them (printed and
        # written only with --per-class).
        classes = per_class or target is not None
        from clusterformer.data.output_lock import hold_output

        # --out and the predictions named after it (NAME.semantic/, NAME.panoptic/): one writer
        guard = (hold_output(out, "cf eval", is_file=True) if out is not None
                 else contextlib.nullcontext())  # fmt: skip
        with guard:
            if predictions is not None:
                if slide is not None or tta is not None:
                    raise UserError("--slide and --tta run a model: use them with --ckpt, not --predictions")
                if task is None:
                    raise UserError("--predictions needs --task")
                metrics = _score_predictions(task, predictions, data, num_workers, classes)
                evaluator = None
                title = f"{task} predictions {predictions} on {data}"
            else:
                from clusterformer.cli.runtime_opts import start_compute

                start_compute(device)
                metrics, evaluator = _evaluate_checkpoint(
                    ckpt, data, batch_size, image_size, device, amp, num_workers, task, out,
                    compile_model=compile_model, per_class=classes, slide=slide, tta=tta,
                )
                title = f"{metrics.pop('_task')} checkpoint {ckpt} on {data}"
            report(title, metrics, out=out, per_class=per_class,
                   run_folder=_run_folder(ckpt) if ckpt is not None else None)
            if target is not None:  # after the table, so the last line says where the plots are
                _write_plots(target, metrics, evaluator)


def _evaluate_checkpoint(
    ckpt: Path,
    data: Path,
    batch_size: int,
    image_size: int | None,
    device: str | None,
    amp: str,
    num_workers: int,
    task_flag: str | None,
    out: Path | None = None,
    *,
    compile_model: bool = False,
    per_class: bool = False,
    slide: tuple[int, int] | None = None,
    tta: str | None = None,
) -> tuple[dict[str, Any], Any]:
    """The checkpoint's metrics on ``data`` (with ``_task``, its task name) and the evaluator
    that computed them (its confusion matrix feeds ``--plots``)."""
    from clusterformer.cli.progress import progress_bar
    from clusterformer.data import build_loader, load_dataset_info
    from clusterformer.engine.distributed import pick_device
    from clusterformer.engine.evaluate import (
        NoPerClassMetrics,
        eval_preprocess,
        evaluate,
        load_model_from_checkpoint,
        make_evaluator,
    )

    dev = pick_device(device)
    model, task, meta = load_model_from_checkpoint(ckpt, dev)
    if task_flag is not None and task_flag != task.name:
        raise UserError(f"--task {task_flag} does not match the checkpoint's task '{task.name}'")
    from clusterformer.tasks.test_time import make_plan

    try:
        plan = make_plan(task.spec, slide, tta)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    predictions_out = None
    if task.spec.prediction_suffix is not None and out is not None:
        from clusterformer.metrics.seg_common import predictions_path_for

        # The predictions go next to the metrics, so they can be re-scored or inspected.
        predictions_out = predictions_path_for(out, task.spec.prediction_suffix)
    info = load_dataset_info(str(data), task.name)
    data_categories = task.spec.categories(info.get("categories") or [])
    _check_categories(meta.get("categories") or [], data_categories, ckpt, data)
    if data_categories:  # scored against the dataset's own ids (and thing / stuff split)
        task = task.spec.build(data_categories, task.options)
    try:
        preprocess = eval_preprocess(meta, image_size)  # the checkpoint's record
    except ValueError as exc:  # a size beyond the bounds of a preprocess record
        raise UserError(f"--image-size {image_size}: {exc}") from None
    size = preprocess.size
    loader = build_loader(str(data), task.name, batch_size=batch_size, image_size=size,
                          train=False, num_workers=num_workers, rank=0, world_size=1,
                          preprocess=preprocess)  # fmt: skip
    if compile_model:
        from clusterformer.engine.compiled import checked_inference_compile

        model = checked_inference_compile(model, amp, f"{task.name} model")
    with progress_bar("eval", len(loader)) as advance:

        def ticks():
            while True:
                advance()
                yield None

        try:
            evaluator = make_evaluator(task, predictions_out, per_class)
            metrics = evaluate(model, task, loader, device=dev, amp=amp, evaluator=evaluator,
                               predictions_out=predictions_out, progress=ticks(),
                               plan=plan)  # fmt: skip
        except FloatingPointError as exc:  # a diverged checkpoint: name it
            raise DataError(f"{ckpt}: {exc}") from None
        except NoPerClassMetrics as exc:  # a plugin task without per-class metrics
            raise UserError(f"--per-class: {exc}") from None
    plan_keys = {"slide": list(plan.slide) if plan.slide else None,
                 "tta": tta} if plan.active else {}  # fmt: skip
    summary = {**metrics, "step": meta.get("step"), "image_size": size, **plan_keys, "_task": task.name}
    return summary, evaluator


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
    task: str, predictions: Path, data: Path, num_workers: int, per_class: bool = False
) -> dict[str, Any]:
    from clusterformer.tasks import task_spec

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


def _run_folder(ckpt: Path) -> Path | None:
    """The run folder of ``--ckpt`` (given as a run folder), where ``per_class.json`` goes
    without ``--out``; ``None`` for a bare checkpoint file."""
    return ckpt if ckpt.is_dir() else None


def report(title: str, metrics: dict[str, Any], *, out: Path | None, per_class: bool,
           run_folder: Path | None = None) -> dict[str, Any]:  # fmt: skip
    """Print the metric table (and the per-class table), write ``--out``; returns what was
    written: the summary metrics, with ``per_class`` (class name -> metrics) when asked."""
    from rich.console import Console

    from clusterformer.cli.metric_table import per_class_table, summary_table
    from clusterformer.engine.files import atomic_write_json
    from clusterformer.metrics.per_class import split_per_class

    summary, classes = split_per_class(metrics)
    console = Console()
    console.print(title, soft_wrap=True)
    console.print(summary_table(summary))
    document: dict[str, Any] = dict(summary)
    if per_class:
        console.print(per_class_table(classes))
        document["per_class"] = classes
    if out is not None:
        atomic_write_json(out, document)
        typer.echo(f"wrote {out}")
    elif per_class and run_folder is not None:
        atomic_write_json(run_folder / "per_class.json", document)
        typer.echo(f"wrote {run_folder / 'per_class.json'}")
    return document


def _write_plots(target: tuple[Path, str], metrics: dict[str, Any], evaluator: Any) -> None:
    from clusterformer.cli.plots import write_eval_plots

    written = write_eval_plots(*target, metrics, evaluator)
    typer.echo(f"wrote {len(written)} plot(s) to {target[0]}: "
               f"{', '.join(p.name for p in written)}" if written else "--plots: nothing to "
               "draw (no confusion matrix or per-class metric for this task)")  # fmt: skip
