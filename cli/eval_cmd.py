"""``cf eval``: score a checkpoint on a dataset, or score saved predictions without a model."""

from __future__ import annotations

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
    ) -> None:
        """Evaluate a checkpoint (--ckpt) or a prediction file (--task T --predictions PATH) on --data.

        Prints a table and, with --out, writes JSON with the task's metrics (classification:
        top1, top5 in percent, top5 being top-min(5, C) for fewer than 5 classes; detection:
        bbox_AP, bbox_AP50, bbox_AP75 by COCOeval; instance segm_AP* + bbox_AP*; semantic mIoU,
        aAcc; panoptic PQ, SQ, RQ, PQ_th, PQ_st) and the predictions beside the metrics,
        re-scorable with --predictions (NAME.detections.json, NAME.segm.json, PNG folder
        NAME.semantic/, or NAME.panoptic.json + NAME.panoptic/).
        """
        if (ckpt is None) == (predictions is None):
            raise UserError(
                "give exactly one of --ckpt (evaluate a model) or --predictions (score a file)"
            )
        if not data.exists():
            raise FileNotFoundError(f"{data}: evaluation data not found")
        if batch_size < 1:
            raise UserError(f"--batch-size must be >= 1, got {batch_size}")
        if predictions is not None:
            if task is None:
                raise UserError("--predictions needs --task")
            metrics = _score_predictions(task, predictions, data, num_workers)
            title = f"{task} predictions {predictions}"
        else:
            from clusterformer.cli.runtime_opts import start_compute

            start_compute(device)
            metrics = _evaluate_checkpoint(
                ckpt, data, batch_size, image_size, device, amp, num_workers, task, out,
                compile_model=compile_model,
            )
            title = f"{metrics.pop('_task')} checkpoint {ckpt}"
        _print_table(title, metrics)
        if out is not None:
            from clusterformer.engine.files import atomic_write_json

            atomic_write_json(out, metrics)
            typer.echo(f"wrote {out}")


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
) -> dict[str, Any]:
    from rich.progress import Progress

    from clusterformer.data import build_loader, load_dataset_info
    from clusterformer.engine.distributed import pick_device
    from clusterformer.engine.evaluate import eval_preprocess, evaluate, load_model_from_checkpoint

    dev = pick_device(device)
    model, task, meta = load_model_from_checkpoint(ckpt, dev)
    if task_flag is not None and task_flag != task.name:
        raise UserError(f"--task {task_flag} does not match the checkpoint's task '{task.name}'")
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
    preprocess = eval_preprocess(meta, image_size)  # the checkpoint's record
    size = preprocess.size
    loader = build_loader(str(data), task.name, batch_size=batch_size, image_size=size,
                          train=False, num_workers=num_workers, rank=0, world_size=1,
                          preprocess=preprocess)  # fmt: skip
    if compile_model:
        from clusterformer.engine.compiled import checked_inference_compile

        model = checked_inference_compile(model, amp, f"{task.name} model")
    with Progress(transient=True) as progress:
        bar = progress.add_task("eval", total=len(loader))

        def ticks():
            while True:
                progress.advance(bar)
                yield None

        try:
            metrics = evaluate(model, task, loader, device=dev, amp=amp,
                               predictions_out=predictions_out, progress=ticks())  # fmt: skip
        except FloatingPointError as exc:  # a diverged checkpoint: name it
            raise DataError(f"{ckpt}: {exc}") from None
    return {**metrics, "step": meta.get("step"), "image_size": size, "_task": task.name}


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
    task: str, predictions: Path, data: Path, num_workers: int
) -> dict[str, Any]:
    from clusterformer.tasks import task_spec

    try:
        spec = task_spec(task)
    except ValueError as exc:
        raise UserError(f"--task: {exc}") from None
    if spec.score_file is None:
        raise UserError(f"the {task} task has no prediction file format to score; evaluate a "
                        "checkpoint with --ckpt")  # fmt: skip
    return spec.score_file(predictions, data, task=spec.name, num_workers=num_workers)


def _print_table(title: str, metrics: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    Console().print(title)
    table = Table()
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in metrics.items():
        table.add_row(key, f"{value:.2f}" if isinstance(value, float) else str(value))
    Console().print(table)
