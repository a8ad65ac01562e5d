"""The training configuration: one typed, nested tree (defaults <- recipe or config file <- flags
<- ``--set``), written to ``RUN/config.yaml`` so that a run can be repeated from it.

Sections: ``task`` (its name and the task's own options), ``model`` (``name``, ``pretrained``,
``backbone``, ``decoder``), ``optim``, ``schedule``, ``data`` (with ``data.augment``) and
``runtime``. Every leaf is a field of a dataclass below (or of the task's options dataclass)
with a default and one line of help; the CLI derives its flags from them
(:mod:`clusterformer.cli.train_flags`). Merging is by key: an override changes the keys it
names and nothing else, never a whole section.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import MISSING, asdict, dataclass, field, fields, is_dataclass
from typing import Any, Union, get_args, get_origin, get_type_hints

from clusterformer.engine.model_settings import preset_settings, same_value
from clusterformer.models.backbones import BackboneOptions
from clusterformer.models.dense import DecoderOptions
from clusterformer.tasks import task_spec
from clusterformer.tasks.spec import option

AMP_MODES: tuple[str, ...] = ("bf16", "fp16", "none")
SCHEDULES: tuple[str, ...] = ("cosine", "poly", "constant")
LOGGERS: tuple[str, ...] = ("tensorboard", "mlflow", "wandb")


def section(kind: type) -> Any:
    return field(default_factory=kind)


@dataclass
class BackboneConfig(BackboneOptions):
    weights: str | None = option(None, "initialise the backbone from this state dict "
                                 "(.safetensors, or a .pt/.pth read with weights_only=True), e.g. "
                                 "ImageNet weights of a timm/<name> model; 'timm': timm's own "
                                 "pretrained weights of a timm/<name> model (Hugging Face Hub "
                                 "when online, else its local cache)", flag="--backbone-weights")


@dataclass
class ModelConfig:
    name: str = option("clusterformer-nano", "model preset (clusterformer-nano, -tiny, -small), "
                       "timm/<name> (a timm model's features as the backbone) or a plugin's "
                       "backbone; `cf models` lists them", flag="--model")
    pretrained: str | None = option(None, "initialise the backbone from this checkpoint (a run "
                                    "folder or .safetensors of the same --model, any task); heads "
                                    "start fresh")
    backbone: BackboneConfig = section(BackboneConfig)
    decoder: DecoderOptions = section(DecoderOptions)


@dataclass
class OptimConfig:
    lr: float = option(1e-3, "peak learning rate for a global batch of lr_base_batch, scaled "
                       "linearly to the real one (from a file, flag or --set alike); used as is "
                       "when lr_base_batch is unset")
    lr_base_batch: int | None = option(None, "global batch the lr is given for (linear scaling; "
                                       "--set optim.lr_base_batch=null: none)")
    weight_decay: float = option(0.05, "AdamW weight decay (not on norms, biases, layer scales)")
    backbone_lr_mult: float = option(1.0, "the backbone's lr relative to the rest")
    grad_clip: float | None = option(None, "clip the global gradient norm to this value")
    accum_steps: int = option(1, "micro-batches per optimizer step (gradient accumulation)")
    ema_decay: float | None = option(None, "keep an EMA of the weights with this decay (e.g. "
                                     "0.9998); checkpoints then hold the EMA weights")


@dataclass
class ScheduleConfig:
    steps: int | None = option(None, "optimizer steps to train (exclusive with epochs)")
    epochs: float | None = option(None, "epochs to train (exclusive with steps)")
    kind: str = option("cosine", "lr schedule after warm-up: cosine, poly or constant",
                       flag="--schedule")
    warmup_steps: int | None = option(None, "linear warm-up steps")
    warmup_epochs: float | None = option(None, "linear warm-up epochs")
    min_lr_ratio: float = option(0.01, "final lr relative to the peak")
    poly_power: float = option(0.9, "exponent of the poly schedule")


@dataclass
class AugmentConfig:
    scale: tuple[float, ...] | None = option(None, "image tasks: random-resized-crop area range "
                                             "(default by the data: 0.35,1 below 64 px, 0.25,1 "
                                             "under 5000 images, else ImageNet's 0.08,1)")
    ratio: tuple[float, ...] | None = option(None, "image tasks: crop aspect range "
                                             "(default 0.75,1.333)")
    scale_range: tuple[float, ...] | None = option(None, "dense tasks: scale jitter of the long "
                                                   "side relative to image_size (default 0.5,2)")
    rand_augment: str | None = option(None, "image tasks: RandAugment policy in timm's notation, "
                                      "e.g. rand-m9-mstd0.5-inc1; none = off")
    random_erasing: float | None = option(None, "image tasks: probability (0-1) of erasing one "
                                          "random rectangle with noise (timm's RandomErasing)")
    flip: bool | None = option(None, "random horizontal flip (default: on, off for classification "
                               "images with a handedness such as digits or text, measured on "
                               "the data); --no-flip / --flip decide")


@dataclass
class DataConfig:
    train: str | None = option(None, "training data: a shard folder (dataset.json) or a raw "
                               "dataset folder", flag="--data")
    val: str | None = option(None, "held-out data evaluated during and after training",
                             flag="--val-data")
    batch_size: int = option(32, "images per process per micro-batch")
    image_size: int = option(224, "training crop size in pixels")
    num_workers: int = option(0, "data loading worker processes per training process")
    on_error: str = option("stop", "on a bad sample or shard (undecodable, over the pixel "
                           "limit, miscounted): stop naming it, or skip it with a warning")
    augment: AugmentConfig = section(AugmentConfig)


@dataclass
class RuntimeConfig:
    out: str | None = option(None, "run folder: config.yaml, metrics.jsonl, checkpoints/")
    seed: int = option(0, "random seed")
    device: str | None = option(None, "cpu, cuda or cuda:N (default: CUDA when available)")
    amp: str | None = option(None, "mixed precision: bf16, fp16 (CUDA) or none (default: bf16 "
                             "on CUDA, none on CPU)")
    compile: bool = option(False, "torch.compile the model; the first batch is checked "
                           "against eager")
    grad_checkpointing: bool = option(False, "recompute each backbone stage in backward (less "
                                      "memory, ~30 % more compute)")
    save_every: int | None = option(None, "also keep a step-NNNNNN checkpoint every this many "
                                    "steps")
    keep_last: int = option(3, "periodic checkpoints kept besides the newest")
    eval_every: int | None = option(None, "evaluate on the val data every this many steps (and "
                                    "at the end)")
    log_every: int = option(10, "log training scalars every this many steps")
    best_metric: str | None = option(None, "after each evaluation keep checkpoints/"
                                     "best.safetensors by this metric (default: the task's "
                                     "headline, e.g. top1, bbox_AP, mIoU, PQ; higher is better "
                                     "unless the task says otherwise)")
    patience: int | None = option(None, "stop early after this many evaluations in a row "
                                  "without a better best_metric (needs --val-data)")
    progress: bool = option(True, "a live progress bar with ETA when stderr is a terminal "
                            "(else, or with --no-progress, plain lines)")
    loggers: tuple[str, ...] | None = option(None, "also log the config and scalars to: "
                                             "tensorboard (RUN/tensorboard), mlflow (file store "
                                             "RUN/mlruns), wandb (offline, RUN/wandb), "
                                             "comma-separated, each an extra of that name; none "
                                             "= metrics.jsonl only (default: tensorboard when "
                                             "installed)", flag="--logger")
    resume: bool = option(False, "continue from the newest complete checkpoint in out (not "
                          "written to config.yaml)")
    restart: bool = option(False, "delete out's previous checkpoints and logs and start at step 0 "
                           "(not written to config.yaml)")


@dataclass
class TaskConfig:
    """``task``: the task's name and its options (the task spec's options dataclass)."""

    name: str | None = None
    options: Any = None

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, **(asdict(self.options) if self.options is not None else {})}


@dataclass
class TrainConfig:
    """Everything a training run needs. ``data.batch_size`` is per process (per GPU); the
    global batch is ``batch_size * world_size * optim.accum_steps``."""

    recipe: str | None = None
    task: TaskConfig = section(TaskConfig)
    model: ModelConfig = section(ModelConfig)
    optim: OptimConfig = section(OptimConfig)
    schedule: ScheduleConfig = section(ScheduleConfig)
    data: DataConfig = section(DataConfig)
    runtime: RuntimeConfig = section(RuntimeConfig)

    def to_dict(self) -> dict[str, Any]:
        """The nested config as plain JSON/YAML values (tuples as lists)."""
        out = {f.name: _plain(getattr(self, f.name)) for f in fields(self) if f.name != "task"}
        return {"recipe": self.recipe, "task": _plain(self.task.to_dict()),
                **{k: v for k, v in out.items() if k != "recipe"}}  # fmt: skip

    def model_overrides(self) -> dict[str, Any]:
        """``create_model`` overrides, by flat name: the set backbone and decoder options that
        differ from what the model builds with anyway (:func:`fill_model_settings` spells
        those out; leaving them out keeps a checkpoint's ``model_config`` the same whether its
        settings were spelled out or not)."""
        preset_backbone, preset_decoder = preset_settings(
            self.model.name, self.task.name, self.model.backbone.dims) if self.task.name else ({}, {})
        backbone = {f.name: getattr(self.model.backbone, f.name) for f in fields(BackboneOptions)
                    if not same_value(getattr(self.model.backbone, f.name),
                                      preset_backbone.get(f.name))}  # fmt: skip
        flat = DecoderOptions.flat_names()
        decoder = {flat[f.name]: getattr(self.model.decoder, f.name) for f in fields(DecoderOptions)
                   if not same_value(getattr(self.model.decoder, f.name),
                                     preset_decoder.get(f.name))}  # fmt: skip
        return {k: _plain(v) for k, v in {**backbone, **decoder}.items() if v is not None}


def fill_model_settings(cfg: TrainConfig) -> None:
    """Set every unset ``model.backbone`` / ``model.decoder`` option the model takes to the
    value it is built with (:func:`~clusterformer.engine.model_settings.preset_settings`)."""
    backbone, decoder = preset_settings(cfg.model.name, cfg.task.name, cfg.model.backbone.dims)
    for section, values in ((cfg.model.backbone, backbone), (cfg.model.decoder, decoder)):
        hints = get_type_hints(type(section))
        for name, value in values.items():
            if getattr(section, name) is None:
                setattr(section, name, coerce_value(_plain(value), hints[name], name))


def _plain(value: Any) -> Any:
    if is_dataclass(value):
        return {f.name: _plain(getattr(value, f.name)) for f in fields(value)}
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


# ----------------------------------------------------------------------------- the typed tree
def leaves(kind: type = TrainConfig, prefix: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any, Any]]:
    """``(path, field, type hint)`` of every leaf of a config section (task options excluded:
    they belong to the task, see :func:`task_option_leaves`)."""
    hints = get_type_hints(kind)
    for f in fields(kind):
        hint = hints[f.name]
        if f.name in ("task", "recipe") and kind is TrainConfig:
            continue
        if isinstance(hint, type) and is_dataclass(hint):
            yield from leaves(hint, (*prefix, f.name))
        else:
            yield (*prefix, f.name), f, hint


def default_of(f: Any) -> Any:
    return f.default if f.default is not MISSING else f.default_factory()


def coerce_value(value: Any, hint: Any, where: str) -> Any:
    """``value`` as the type ``hint`` names (``int | None``, ``tuple[float, ...] | None``, ...):
    ints pass as floats, lists as tuples, a ``"a,b"`` string as a tuple; ValueError naming
    ``where`` when it does not fit."""
    args = get_args(hint)
    if get_origin(hint) in (Union, type(int | None)) and type(None) in args:
        if value is None:
            return None
        hint = next(a for a in args if a is not type(None))
    if get_origin(hint) is tuple:
        item = get_args(hint)[0]
        if isinstance(value, str):
            value = [v for v in value.replace("(", "").replace(")", "").split(",") if v.strip()]
            value = [_scalar(v.strip(), item, where) for v in value]
        if not isinstance(value, list | tuple):
            raise ValueError(f"{where}: expected a list of {item.__name__}, got {value!r}")
        return tuple(coerce_value(v, item, where) for v in value)
    return _scalar(value, hint, where)


def _scalar(value: Any, kind: type, where: str) -> Any:
    if isinstance(value, str) and kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, kind) and not (kind is int and isinstance(value, bool)):
        return value
    raise ValueError(f"{where}: expected {kind.__name__}, got {value!r}")


def _build(kind: type, values: Mapping[str, Any], where: str) -> Any:
    """Dataclass ``kind`` from a nested mapping; unknown keys and bad types name their path."""
    hints = get_type_hints(kind)
    known = {f.name: f for f in fields(kind)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        path = f"{where}.{unknown[0]}" if where else unknown[0]
        raise ValueError(f"{path}: unknown setting; {where or 'the config'} has "
                         f"{', '.join(known)}")  # fmt: skip
    kwargs = {}
    for name, value in values.items():
        path = f"{where}.{name}" if where else name
        hint = hints[name]
        if isinstance(hint, type) and is_dataclass(hint):
            if value is None:
                continue
            if not isinstance(value, Mapping):
                raise ValueError(f"{path}: expected a section of settings, got {value!r}")
            kwargs[name] = _build(hint, value, path)
        else:
            kwargs[name] = coerce_value(value, hint, path)
    return kind(**kwargs)


def build_config(values: Mapping[str, Any]) -> TrainConfig:
    """The typed config from a merged nested mapping; validates every value.

    Raises:
        ValueError: an unknown key, a value of the wrong type or out of range (naming it).
    """
    values = dict(values)
    task_values = dict(values.pop("task", None) or {})
    name = task_values.pop("name", None)
    cfg = _build(TrainConfig, values, "")
    if name is None:
        raise ValueError("task.name: no task given; pass --task (or a --recipe / --config that "
                         "names one)")  # fmt: skip
    try:
        spec = task_spec(name)
    except ValueError as exc:
        raise ValueError(f"task.name: {exc}") from None
    cfg.task = TaskConfig(name, spec.make_options(task_values))
    _check_finite(cfg)  # before the task's own range checks, which NaN slips past or garbles
    best = cfg.runtime.best_metric
    if best is not None and best not in spec.metric_keys:
        raise ValueError(f"runtime.best_metric: '{best}' is not a metric of the {name} task "
                         f"(its metrics: {', '.join(spec.metric_keys)})")  # fmt: skip
    spec.build(spec.categories([]), cfg.task.options)  # its own checks (label smoothing range)
    validate(cfg)
    fill_model_settings(cfg)
    return cfg


def _floats(values: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, float]]:
    """``(dotted key, value)`` of every float in a nested config dict, list items included."""
    for key, value in values.items():
        where = f"{prefix}{key}"
        if isinstance(value, Mapping):
            yield from _floats(value, f"{where}.")
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, float):
                yield where, item


def _check_finite(cfg: TrainConfig) -> None:
    """No setting is a rate, weight, ratio or count for which NaN or infinity means anything
    (``--lr nan`` would train on NaN weights; ``--grad-clip inf`` is spelled by leaving it
    out), and YAML reads ``.nan`` / ``.inf`` and the flags ``nan`` / ``inf`` as floats."""
    for where, value in _floats(cfg.to_dict()):
        if not math.isfinite(value):
            flag = _flag_of(where, task_spec(cfg.task.name))
            named = f"{where} ({flag})" if flag else where
            raise ValueError(f"{named} must be a finite number, got {value}")


def flag_name(f: Any) -> str:
    """The command-line flag of a config or task-option field: its ``flag`` metadata, else
    ``--`` and its name (or ``flat`` name) with dashes (``data.batch_size`` -> ``--batch-size``)."""
    return f.metadata.get("flag") or "--" + (f.metadata.get("flat") or f.name).replace("_", "-")


def _flag_of(key: str, spec: Any) -> str | None:
    """The flag that sets the dotted config ``key`` (``task.<option>``: ``spec``'s option)."""
    if key.startswith("task."):
        f = spec.option_fields().get(key[len("task."):])
        return None if f is None else flag_name(f)
    return next((flag_name(f) for path, f, _ in leaves() if ".".join(path) == key), None)


def validate(cfg: TrainConfig) -> None:
    """Raise ValueError naming the setting when one is out of range."""
    run, sched = cfg.runtime, cfg.schedule
    if run.amp is not None and run.amp not in AMP_MODES:
        raise ValueError(f"runtime.amp must be one of {', '.join(AMP_MODES)}, got '{run.amp}'")
    if sched.kind not in SCHEDULES:
        raise ValueError(f"schedule.kind must be one of {', '.join(SCHEDULES)}, got '{sched.kind}'")
    if cfg.data.on_error not in ("stop", "skip"):
        raise ValueError(f"data.on_error (--on-error) must be stop or skip, got "
                         f"'{cfg.data.on_error}'")  # fmt: skip
    for where, value in (("data.batch_size", cfg.data.batch_size), ("data.image_size",
                         cfg.data.image_size), ("optim.accum_steps", cfg.optim.accum_steps),
                         ("runtime.keep_last", run.keep_last), ("runtime.log_every",
                         run.log_every)):  # fmt: skip
        if value < 1:
            raise ValueError(f"{where} must be >= 1, got {value}")
    for where, value, low in (("schedule.steps", sched.steps, 1), ("runtime.save_every",
                              run.save_every, 1), ("runtime.eval_every", run.eval_every, 1),
                              ("schedule.warmup_steps", sched.warmup_steps, 0),
                              ("runtime.patience", run.patience, 1),
                              ("optim.lr_base_batch", cfg.optim.lr_base_batch, 1)):  # fmt: skip
        if value is not None and value < low:
            raise ValueError(f"{where} must be >= {low}, got {value}")
    if sched.steps is not None and sched.epochs is not None:
        raise ValueError("give either schedule.steps (--steps) or schedule.epochs (--epochs), "
                         "not both")  # fmt: skip
    if sched.epochs is not None and sched.epochs <= 0:
        raise ValueError(f"schedule.epochs must be positive, got {sched.epochs}")
    if cfg.optim.lr <= 0:
        raise ValueError(f"optim.lr must be positive, got {cfg.optim.lr}")
    if cfg.optim.ema_decay is not None and not 0.0 < cfg.optim.ema_decay < 1.0:
        raise ValueError(f"optim.ema_decay must be in (0, 1), got {cfg.optim.ema_decay}")
    erasing = cfg.data.augment.random_erasing
    if erasing is not None and not 0.0 <= erasing <= 1.0:
        raise ValueError(f"data.augment.random_erasing must be in [0, 1], got {erasing}")
    if (run.patience is not None or run.best_metric is not None) and cfg.data.val is None:
        raise ValueError("runtime.patience and runtime.best_metric need held-out data: give "
                         "--val-data (data.val)")  # fmt: skip
    unknown = sorted(set(run.loggers or ()) - {*LOGGERS, "none"})
    if unknown or ("none" in (run.loggers or ()) and len(run.loggers) > 1):
        raise ValueError(f"runtime.loggers takes {', '.join(LOGGERS)} or none alone, got "
                         f"{','.join(run.loggers)}")  # fmt: skip
    if run.resume and run.restart:
        raise ValueError("runtime.resume and runtime.restart exclude each other; give one")
