"""``cf train``: train a model for a task on sharded (or raw-format) data."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import typer

from clusterformer.cli.errors import UserError

TASKS = ("classification", "detection", "instance", "semantic", "panoptic")
AMP = ("bf16", "fp16", "none")


def register(app: typer.Typer) -> None:
    @app.command("train")
    def train_command(
        task: str = typer.Option(..., "--task", help=f"Task to train: {', '.join(TASKS)}."),
        data: Path = typer.Option(
            ...,
            "--data",
            help="Training data: a shard folder (dataset.json) or a raw dataset folder.",
        ),
        out: Path = typer.Option(
            ..., "--out", help="Run folder: config.json, metrics.jsonl, checkpoints/."
        ),
        val_data: Path | None = typer.Option(
            None, "--val-data", help="Held-out data evaluated during and after training."
        ),
        model: str | None = typer.Option(
            None,
            "--model",
            help="Model preset: clusterformer-nano, clusterformer-tiny or clusterformer-small (default nano, or the recipe's).",
        ),
        pretrained: Path | None = typer.Option(
            None, "--pretrained", help="Initialise the backbone from this checkpoint (a run "
            "folder or .safetensors of the same --model preset, any task; e.g. a classification "
            "run before detection or segmentation). Heads start fresh.",
        ),
        steps: int | None = typer.Option(
            None, "--steps", help="Optimizer steps to train (exclusive with --epochs)."
        ),
        epochs: float | None = typer.Option(
            None, "--epochs", help="Epochs to train (exclusive with --steps)."
        ),
        batch_size: int | None = typer.Option(
            None,
            "--batch-size",
            help="Images per process per micro-batch (global batch = this x processes x accumulation).",
        ),
        lr: float | None = typer.Option(
            None,
            "--lr",
            help="Peak learning rate, used as given (a recipe's linear batch scaling is dropped).",
        ),
        image_size: int | None = typer.Option(
            None, "--image-size", help="Training crop size in pixels."
        ),
        compile_model: bool | None = typer.Option(
            None, "--compile/--no-compile",
            help="torch.compile the model (inductor); the first batch is checked against eager "
            "and a difference stops the run.",
        ),
        grad_checkpointing: bool | None = typer.Option(
            None, "--grad-checkpointing/--no-grad-checkpointing",
            help="Recompute each backbone stage in backward: less activation memory, ~30 % more compute.",
        ),
        amp: str | None = typer.Option(
            None,
            "--amp",
            help="Mixed precision: bf16 (CPU or CUDA), fp16 (CUDA only) or none. Default: bf16 on CUDA, none on CPU.",
        ),
        resume: bool = typer.Option(
            False,
            "--resume",
            help="Continue from the newest complete checkpoint in OUT/checkpoints (starts at "
            "step 0 only when OUT holds no checkpoint; stops with the reason when one is unusable).",
        ),
        restart: bool = typer.Option(
            False,
            "--restart",
            help="Start over at step 0 in OUT: deletes OUT's previous checkpoints, metrics.jsonl "
            "and tensorboard/ first.",
        ),
        seed: int | None = typer.Option(None, "--seed", help="Random seed (default 0)."),
        save_every: int | None = typer.Option(
            None, "--save-every", help="Also keep a step-NNNNNN checkpoint every this many steps."
        ),
        eval_every: int | None = typer.Option(
            None,
            "--eval-every",
            help="Evaluate on --val-data every this many steps (and always at the end).",
        ),
        recipe: str | None = typer.Option(
            None,
            "--recipe",
            help="Named settings preset: the paper's imagenet-1k, coco-detection, coco-panoptic, coco-instance and ade20k-semantic, or shapes / shapes-panoptic (the quickstart's synthetic data). Explicit flags override it.",
        ),
        accum_steps: int | None = typer.Option(
            None, "--accum-steps", help="Micro-batches per optimizer step (gradient accumulation)."
        ),
        warmup_steps: int | None = typer.Option(
            None, "--warmup-steps", help="Linear warm-up steps."
        ),
        weight_decay: float | None = typer.Option(
            None,
            "--weight-decay",
            help="AdamW weight decay (not applied to norms, biases, layer scales).",
        ),
        grad_clip: float | None = typer.Option(
            None, "--grad-clip", help="Clip the global gradient norm to this value."
        ),
        schedule: str | None = typer.Option(
            None, "--schedule", help="LR schedule after warm-up: cosine, poly or constant."
        ),
        ema_decay: float | None = typer.Option(
            None,
            "--ema-decay",
            help="Keep an EMA of the weights with this decay (e.g. 0.9998); checkpoints then hold the EMA weights.",
        ),
        label_smoothing: float | None = typer.Option(
            None, "--label-smoothing", help="Classification: label smoothing (default 0.1)."
        ),
        mixup: float | None = typer.Option(
            None, "--mixup", help="Classification: mixup alpha (0 = off)."
        ),
        cutmix: float | None = typer.Option(
            None, "--cutmix", help="Classification: cutmix alpha (0 = off)."
        ),
        rand_augment: str | None = typer.Option(
            None,
            "--rand-augment",
            help="Classification: RandAugment policy in timm's notation, e.g. rand-m9-mstd0.5-inc1 (m magnitude 0-10, n ops per image (default 2), mstd magnitude noise, inc1 ops that grow with magnitude); 'none' turns a recipe's off.",
        ),
        random_erasing: float | None = typer.Option(
            None,
            "--random-erasing",
            help="Classification: probability (0-1) of erasing one random rectangle with noise, as timm's RandomErasing (0 = off; imagenet-1k uses 0.25).",
        ),
        head_pool: str | None = typer.Option(
            None,
            "--head-pool",
            help="Classification head pooling: last (stage 4) or concat (all stages).",
        ),
        num_workers: int | None = typer.Option(
            None, "--num-workers", help="Data loading worker processes per training process."
        ),
        device: str | None = typer.Option(
            None, "--device", help="cpu, cuda or cuda:N (default: CUDA when available)."
        ),
        log_every: int | None = typer.Option(
            None, "--log-every", help="Log training scalars every this many steps."
        ),
        keep_last: int | None = typer.Option(
            None, "--keep-last", help="How many periodic step-NNNNNN checkpoints (--save-every) to keep besides the newest (default 3)."
        ),
    ) -> None:
        """Train a model; writes OUT/config.json, OUT/metrics.jsonl and OUT/checkpoints/last.safetensors (+ last.state.pt).

        Runs unchanged under `torchrun --nproc-per-node N -m clusterformer.cli train ...`.
        On SIGTERM/SIGINT it saves a checkpoint, then exits with 128 + the signal number.
        """
        if task not in TASKS:
            raise UserError(f"--task must be one of {', '.join(TASKS)}, got '{task}'")
        if resume and restart:
            raise UserError("--resume and --restart exclude each other; give one")
        from clusterformer.tasks import AVAILABLE_TASKS

        if task not in AVAILABLE_TASKS:
            raise UserError(
                f"training for task '{task}' arrives in a later release; "
                f"available now: {', '.join(AVAILABLE_TASKS)}"
            )
        if amp is not None and amp not in AMP:
            raise UserError(f"--amp must be one of {', '.join(AMP)}, got '{amp}'")
        if not data.exists():
            raise FileNotFoundError(f"{data}: training data not found")
        if val_data is not None and not val_data.exists():
            raise FileNotFoundError(f"{val_data}: validation data not found")
        if rand_augment is not None and rand_augment.strip().lower() != "none":
            from clusterformer.data.rand_augment import parse_rand_augment

            try:
                parse_rand_augment(rand_augment)
            except ValueError as exc:
                raise UserError(f"--rand-augment: {exc}") from None
        if pretrained is not None and not pretrained.exists():
            raise FileNotFoundError(f"{pretrained}: --pretrained checkpoint not found")
        if random_erasing is not None and not 0.0 <= random_erasing <= 1.0:
            raise UserError(f"--random-erasing must be in [0, 1], got {random_erasing}")
        if model is not None:
            from clusterformer.models import list_models

            if model not in list_models():
                raise UserError(f"--model must be one of {', '.join(list_models())}, got '{model}'")

        from clusterformer.engine.config import resolve_config
        from clusterformer.engine.loop import TrainingInterrupted, train

        overrides = {"head_pool": head_pool} if head_pool else None
        try:
            cfg = resolve_config(
                recipe,
                task=task,
                data=str(data),
                out=str(out),
                val_data=str(val_data) if val_data else None,
                model=model,
                pretrained=str(pretrained) if pretrained else None,
                steps=steps,
                epochs=epochs,
                batch_size=batch_size,
                lr=lr,
                image_size=image_size,
                compile=compile_model,
                grad_checkpointing=grad_checkpointing,
                amp=amp,
                resume=resume or None,
                restart=restart or None,
                seed=seed,
                save_every=save_every,
                eval_every=eval_every,
                accum_steps=accum_steps,
                warmup_steps=warmup_steps,
                weight_decay=weight_decay,
                grad_clip=grad_clip,
                schedule=schedule,
                ema_decay=ema_decay,
                label_smoothing=label_smoothing,
                mixup_alpha=mixup,
                cutmix_alpha=cutmix,
                rand_augment=rand_augment,
                random_erasing=random_erasing,
                model_overrides=overrides,
                num_workers=num_workers,
                device=device,
                log_every=log_every,
                keep_last=keep_last,
            )
        except ValueError as exc:  # a flag value out of range is a usage error (exit 2)
            raise UserError(str(exc)) from None
        from clusterformer.cli.runtime_opts import start_compute

        start_compute(cfg.device)
        try:
            result = train(cfg)
        except TrainingInterrupted as exc:
            print(f"cf: {exc}", file=sys.stderr)
            raise typer.Exit(exc.exit_code) from None
        if int(os.environ.get("RANK", "0")) == 0:
            _print_summary(result)


def _print_summary(result) -> None:  # noqa: ANN001 - TrainResult, imported lazily
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if result.metrics:
        table = Table(title=f"held-out, step {result.step}")
        table.add_column("metric")
        table.add_column("value", justify="right")
        for key, value in result.metrics.items():
            table.add_row(key, f"{value:.2f}" if isinstance(value, float) else str(value))
        console.print(table)
    console.print(f"trained {result.step} steps; checkpoint: {result.checkpoint}")
    console.print(f"run folder: {result.run_dir} (config.json, metrics.jsonl, checkpoints/)")
