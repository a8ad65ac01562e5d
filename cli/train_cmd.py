"""``cf train``: train a model for a task on sharded (or raw-format) data.

Its flags come from the training config (:mod:`clusterformer.cli.train_flags`), so building
them imports the task modules (and torch): ``cf`` registers a light stand-in that builds the
real command only when ``cf train`` runs, and ``cf --help`` stays instant.
"""

from __future__ import annotations

import inspect
import os
import sys
from pathlib import Path
from typing import Any

import typer

from clusterformer.cli.errors import UserError

HELP = "Train a model: from flags, a named --recipe or a --config file, with --set overrides."
DOC = """Train a model; writes OUT/config.yaml (its settings: `cf train --config OUT/config.yaml --out NEW` repeats the run), OUT/config.json, OUT/metrics.jsonl and OUT/checkpoints/.

Settings merge key by key: the defaults, then --recipe NAME or --config FILE, then the flags, then every --set KEY=VALUE (e.g. --set model.decoder.num_queries=50). `cf train --help-all` lists every setting; each is also a flag. `cf train --out RUN --resume [--steps N]` continues RUN with RUN's own settings.

Runs unchanged under `torchrun --nproc-per-node N -m clusterformer.cli train ...`; on SIGTERM/SIGINT it saves a checkpoint, then exits with 128 + the signal number.
"""


def register(app: typer.Typer) -> None:
    @app.command("train", help=HELP, add_help_option=False,
                 context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
    def train_stub(ctx: typer.Context) -> None:
        from clusterformer.cli.progress import progress_enabled

        quiet = {"--help", "--help-all", "--print-config"} & set(ctx.args)
        if progress_enabled() and not quiet:  # a person at a terminal: say something at once
            print("cf train: loading torch and the model code ...", file=sys.stderr, flush=True)
        code = build_command().main(args=list(ctx.args), prog_name="cf train",
                                    standalone_mode=False)  # fmt: skip
        if code:
            raise typer.Exit(code)


def build_command() -> Any:
    """The full ``cf train`` command, its flags derived from the config."""
    from clusterformer.cli.train_flags import typer_parameters
    from clusterformer.engine.config_files import recipe_summaries
    from clusterformer.engine.config_flags import config_flags

    flags = config_flags()
    recipes = ", ".join(f"{name} ({about.split(':')[0]})" for name, about in recipe_summaries().items())
    own = [
        inspect.Parameter("recipe", inspect.Parameter.KEYWORD_ONLY, annotation=str | None,
                          default=typer.Option(None, "--recipe", help=f"Named settings (task): {recipes}; `cf train --recipe NAME --print-config` shows one.")),
        inspect.Parameter("config", inspect.Parameter.KEYWORD_ONLY, annotation=Path | None,
                          default=typer.Option(None, "--config", help="Settings file (YAML, TOML "
                                               "or JSON), e.g. a run's config.yaml or a recipe.")),
        inspect.Parameter("set", inspect.Parameter.KEYWORD_ONLY, annotation=list[str] | None,
                          default=typer.Option(None, "--set", metavar="KEY=VALUE", help="Set one "
                                               "setting by its dotted key (VALUE read as YAML); "
                                               "repeatable, applied last.")),
        inspect.Parameter("print_config", inspect.Parameter.KEYWORD_ONLY, annotation=bool,
                          default=typer.Option(False, "--print-config", help="Print the merged "
                                               "settings as YAML and exit.")),
        inspect.Parameter("help_all", inspect.Parameter.KEYWORD_ONLY, annotation=bool,
                          default=typer.Option(False, "--help-all", is_eager=True,
                                               callback=lambda value: _help_all(value, flags),
                                               help="List every setting: its config key, "
                                               "flag and help; then exit.")),
    ]

    def train_command(**values: Any) -> None:
        run(values)

    train_command.__doc__ = DOC
    train_command.__signature__ = inspect.Signature(own + typer_parameters(flags))  # type: ignore[attr-defined]
    sub = typer.Typer(add_completion=False, pretty_exceptions_enable=False,
                      rich_markup_mode="rich")  # fmt: skip
    sub.command("train")(train_command)
    from clusterformer.cli.help_defaults import show_every_default
    from clusterformer.cli.help_width import fit_help_to_width
    from clusterformer.cli.image_limit import with_image_limit

    return fit_help_to_width(with_image_limit(show_every_default(typer.main.get_command(sub))))


def _help_all(value: bool, flags: list[Any]) -> None:
    if not value:
        return
    from clusterformer.cli.help_width import terminal_columns
    from clusterformer.cli.train_flags import reference_text

    typer.echo(reference_text(flags, terminal_columns()), nl=False)
    raise typer.Exit()


def run(values: dict[str, Any]) -> None:
    """Resolve the settings, check the paths, train, print a summary."""
    from clusterformer.engine.config_files import resolve_config, resumed_config_file, to_yaml

    recipe, config, sets = values.pop("recipe"), values.pop("config"), values.pop("set") or []
    print_config = values.pop("print_config")
    values.pop("help_all")
    try:
        cfg = resolve_config(recipe, config, sets, **values)
    except ValueError as exc:  # a value out of range, an unknown key: a usage error (exit 2)
        raise UserError(str(exc)) from None
    own = None if recipe or config else resumed_config_file(
        {"runtime.out": cfg.runtime.out, "runtime.resume": cfg.runtime.resume})
    if print_config:
        typer.echo(to_yaml(cfg), nl=False)
        return
    check_paths(cfg)
    from clusterformer.cli.progress import progress_enabled
    from clusterformer.cli.runtime_opts import augmentation_part, start_compute
    from clusterformer.engine.loop import TrainingInterrupted, train

    augmentation = augmentation_part(cfg)
    start_compute(cfg.runtime.device,
                  details=[*start_details(cfg), *([augmentation] if augmentation else []),
                           *([f"--resume: settings from {own}"] if own else [])])  # fmt: skip
    try:  # no bar when piped or switched off: this process's state, not a run setting
        result = train(cfg, bars=progress_enabled())
    except TrainingInterrupted as exc:
        print(f"cf: {exc}", file=sys.stderr)
        raise typer.Exit(exc.exit_code) from None
    if int(os.environ.get("RANK", "0")) == 0:
        _print_summary(result, same_data(cfg))


def same_data(cfg: Any) -> bool:
    """Whether the validation data is the training data (the same resolved path)."""
    return cfg.data.val is not None and Path(cfg.data.val).resolve() == Path(cfg.data.train).resolve()


def start_details(cfg: Any) -> list[str]:
    """The start line's second line: task, model, data sizes, steps, batch, run folder. A part
    that cannot be known yet (unreadable data, no step count) is left out: training itself
    then stops with its own one-line error, in its own order."""
    from clusterformer.data import load_dataset_info
    from clusterformer.engine.loop import plan_schedule

    def samples(path: str) -> int | None:
        try:
            return int(load_dataset_info(path, cfg.task.name).get("num_samples") or 0)
        except (OSError, ValueError):
            return None

    count = samples(cfg.data.train)
    parts = [f"train {cfg.task.name} {cfg.model.name}, {cfg.data.image_size} px",
             f"data {cfg.data.train}" + (f" ({count} samples)" if count is not None else "")]
    if cfg.data.val is not None:
        if same_data(cfg):
            parts[-1] += ", validated on the training data itself (not held out)"
        else:
            val = samples(cfg.data.val)
            parts[-1] += f", val {cfg.data.val}" + (f" ({val} samples)" if val is not None else "")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    try:
        plan = plan_schedule(cfg, max((count or 0) // (cfg.data.batch_size * world), 1), world)
    except ValueError:  # no --steps / --epochs: train() says so
        plan = None
    if plan is not None and count is not None:
        about = "" if cfg.schedule.steps is not None else "about "
        epochs = plan["total_steps"] / plan["steps_per_epoch"]
        parts.append(f"{about}{plan['total_steps']} steps ({epochs:.3g} epoch(s)) of "
                     f"{plan['global_batch']} images")  # fmt: skip
    parts.append(f"run folder {cfg.runtime.out}")
    return ["; ".join(parts)]


def check_paths(cfg: Any) -> None:
    """What training needs before it starts: a data folder, a run folder, files that exist,
    a known model, a readable RandAugment policy."""
    from clusterformer.models.backbone_weights import PUBLISHED_WEIGHTS
    from clusterformer.models.backbones import backbone_names, is_backbone

    if cfg.data.train is None or cfg.runtime.out is None:
        raise UserError("give --data and --out (or data.train / runtime.out in the --config)")
    weights = cfg.model.backbone.weights
    for where, path in (("training data", cfg.data.train), ("validation data", cfg.data.val),
                        ("--pretrained checkpoint", cfg.model.pretrained),
                        ("--backbone-weights file", None if weights == PUBLISHED_WEIGHTS
                         else weights)):  # fmt: skip
        if path is not None and not Path(path).exists():
            raise FileNotFoundError(f"{path}: {where} not found")
    if not is_backbone(cfg.model.name):
        raise UserError(f"--model must be one of {', '.join(backbone_names())}, got "
                        f"'{cfg.model.name}'")  # fmt: skip
    policy = cfg.data.augment.rand_augment
    if policy is not None and policy.strip().lower() != "none":
        from clusterformer.data.rand_augment import parse_rand_augment

        try:
            parse_rand_augment(policy)
        except ValueError as exc:
            raise UserError(f"--rand-augment: {exc}") from None


def _print_summary(result: Any, on_training_data: bool = False) -> None:
    from rich.console import Console

    from clusterformer.cli.metric_table import summary_table

    console = Console()
    if result.metrics:
        where = ("on the training data (--val-data is --data: not held out)" if on_training_data
                 else "held-out")  # fmt: skip
        console.print(f"{where}, step {result.step}")
        console.print(summary_table(result.metrics))
    if result.best is not None:
        console.print(f"best {result.best['metric']} {result.best['value']:.4g} at step "
                      f"{result.best['step']}: {result.run_dir / 'checkpoints' / 'best.safetensors'}")
    if result.stopped_early:
        console.print(f"stopped early at step {result.step} (--patience)")
    console.print(f"trained {result.step} steps; checkpoint: {result.checkpoint}")
    console.print(f"run folder: {result.run_dir} (config.yaml, metrics.jsonl, checkpoints/)")
