"""The training loop, the same for every task and every launch (1 CPU .. many nodes).

``train(cfg)`` builds the task (with the dataset's categories), model, data and optimizer
from a :class:`~clusterformer.engine.config.TrainConfig`, optionally resumes, then runs a
:class:`~clusterformer.engine.trainer.Trainer`: a short loop over
:func:`~clusterformer.engine.step.train_step` whose logging, evaluation, EMA and checkpoints
are hooks (:mod:`clusterformer.engine.hooks`). It
knows nothing task-specific: the task does. SIGTERM / SIGINT make it save a checkpoint and
raise :class:`TrainingInterrupted`.
"""

from __future__ import annotations

import contextlib
import copy
import json
import platform
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from clusterformer.data.output_lock import hold_output
from clusterformer.engine import checkpoint as ckpt
from clusterformer.engine import run_folder
from clusterformer.engine.augment_plan import (  # augment_options: re-exported, tests use it
    AugmentPlan,
    augment_options,  # noqa: F401
    plan_augmentation,
)
from clusterformer.engine.best import BestCheckpoint, read_best
from clusterformer.engine.config import TrainConfig
from clusterformer.engine.config_files import settings, to_yaml
from clusterformer.engine.distributed import (
    DistEnv,
    barrier,
    cleanup_distributed,
    mark_started,
    resumes_after_restart,
    setup_distributed,
)
from clusterformer.engine.evaluate import checkpoint_metadata, normalisation_of
from clusterformer.engine.hooks import CheckpointHook, EmaHook, EvalHook, LoggingHook
from clusterformer.engine.loggers import build_logger_hooks
from clusterformer.engine.logging import RunLogger
from clusterformer.engine.optim import Schedule, build_optimizer
from clusterformer.engine.signals import StopFlag, TrainingInterrupted
from clusterformer.engine.step import make_scaler
from clusterformer.engine.trainer import HookBase, Saved, Trainer
from clusterformer.engine.world_change import fit_world_size
from clusterformer.tasks import Task, task_spec

__all__ = [
    "PreparedRun",
    "TrainResult",
    "Trainer",
    "TrainingInterrupted",
    "elastic_restart_config",
    "prepare_training",
    "train",
]


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    checkpoint: Path | None
    metrics: dict[str, float] = field(default_factory=dict)
    best: dict[str, Any] | None = None  # RUN/checkpoints/best.json: metric, value, step
    stopped_early: bool = False


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    torch.backends.cudnn.benchmark = False


def _build_loaders(cfg: TrainConfig, env: DistEnv, task: Task, normalisation: dict[str, Any],
                   plan: AugmentPlan) -> tuple[Any, Any | None]:  # fmt: skip
    from clusterformer.data import LoaderSpec, build_loader

    common = {"rank": env.rank, "world_size": env.world_size, "num_workers": cfg.data.num_workers,
              "batch_size": cfg.data.batch_size, "image_size": cfg.data.image_size,
              "seed": cfg.runtime.seed, "normalisation": normalisation,
              "on_error": cfg.data.on_error}  # fmt: skip
    train_loader = build_loader(cfg.data.train, task.name,
                                LoaderSpec(train=True, augment=plan.train, **common))
    if len(train_loader) == 0:
        raise ValueError(f"{cfg.data.train}: fewer samples than one batch of "
                         f"{cfg.data.batch_size} per process")  # fmt: skip
    val_loader = None
    if cfg.data.val:  # evaluated with the record the checkpoint stores
        val_spec = LoaderSpec(train=False, preprocess=plan.eval_record(normalisation), **common)
        val_loader = build_loader(cfg.data.val, task.name, val_spec)
    return train_loader, val_loader


def plan_schedule(cfg: TrainConfig, batches_per_epoch: int, world_size: int) -> dict[str, Any]:
    """Total and warm-up steps, steps per epoch, global batch and effective lr of ``cfg``."""
    sched, optim = cfg.schedule, cfg.optim
    steps_per_epoch = max(batches_per_epoch // optim.accum_steps, 1)
    if sched.steps is not None:
        total = sched.steps
    elif sched.epochs is not None:
        total = max(round(sched.epochs * steps_per_epoch), 1)
    else:
        raise ValueError("give --steps or --epochs (or a --recipe that sets one)")
    if sched.warmup_steps is not None:
        warmup = sched.warmup_steps
    elif sched.warmup_epochs is not None:
        warmup = round(sched.warmup_epochs * steps_per_epoch)
    else:
        warmup = 0
    global_batch = cfg.data.batch_size * world_size * optim.accum_steps
    lr, rule = effective_lr(optim.lr, optim.lr_base_batch, global_batch)
    limit = max(total - 1, 0)  # the last step trains at the schedule's peak or below
    warnings = []
    if warmup > limit:
        given = ("schedule.warmup_steps" if sched.warmup_steps is not None
                 else f"schedule.warmup_epochs {sched.warmup_epochs:g}")  # fmt: skip
        warnings.append(f"warning: {given} asks for {warmup} warm-up steps in a run of {total} "
                        f"steps; clamped to {limit}")  # fmt: skip
    return {"total_steps": total, "warmup_steps": min(warmup, limit),
            "steps_per_epoch": steps_per_epoch, "global_batch": global_batch, "lr_effective": lr,
            "lr_rule": rule, "schedule_warnings": warnings}


def effective_lr(lr: float, base_batch: int | None, global_batch: int) -> tuple[float, str]:
    """The peak lr a run trains with and how it came about. One rule for every layer of the
    settings (mmengine's ``auto_scale_lr``): ``optim.lr`` is the rate for a global batch of
    ``optim.lr_base_batch`` images, scaled linearly to the real global batch, whether a
    recipe, a config file, ``--lr`` or ``--set`` gave it; without ``lr_base_batch`` it is used
    as is. So a config printed by ``--print-config`` (both keys) trains with the same lr."""
    if not base_batch:
        return lr, f"optim.lr {lr:g} as given (no optim.lr_base_batch)"
    return lr * global_batch / base_batch, (f"optim.lr {lr:g} for a global batch of {base_batch}, "
                                            f"x {global_batch}/{base_batch}")  # fmt: skip


def _wrap(module: nn.Module, cfg: TrainConfig, env: DistEnv, amp: str) -> nn.Module:
    if cfg.runtime.grad_checkpointing:
        switches = [m for m in module.modules() if hasattr(m, "set_grad_checkpointing")]
        if not switches:
            raise ValueError(f"--grad-checkpointing: {cfg.model.name} has no checkpointable stages")
        for switch in switches:
            switch.set_grad_checkpointing(True)
    model: nn.Module = module
    if env.distributed:
        from torch.nn.parallel import DistributedDataParallel

        ids = [env.device.index] if env.device.type == "cuda" else None
        model = DistributedDataParallel(module, device_ids=ids)
    if cfg.runtime.compile:
        from clusterformer.engine.compiled import CheckedCompile, compile_model, tolerance_for

        # The first batch also runs eagerly: a compiler bug stops the run with one line.
        model = CheckedCompile(compile_model(model, inference=False), module,
                               tolerance=tolerance_for(amp))
    return model


def _previous_config(run_dir: Path) -> dict[str, Any]:
    """The settings the run folder's last start recorded (config.json), {} when none."""
    try:
        return json.loads(ckpt.RunLayout(run_dir).config_json.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return {}


def resume_changes(before: dict[str, Any], cfg: TrainConfig) -> dict[str, list[Any]]:
    """The optimizer and schedule settings (``optim.*``, ``schedule.*``) that differ between
    the recorded config ``before`` and ``cfg``: dotted key -> [before, now]."""
    now = cfg.to_dict()
    changed = {}
    for section in ("optim", "schedule"):
        old, new = before.get(section) or {}, now[section]
        for key in sorted(new):
            if key in old and old[key] != new[key]:
                changed[f"{section}.{key}"] = [old[key], new[key]]
    return changed


def _write_config(run_dir: Path, cfg: TrainConfig, facts: dict[str, Any],
                  previous: dict[str, Any] | None = None) -> None:  # fmt: skip
    """``config.yaml`` (the settings, enough to repeat the run) and ``config.json`` (the
    settings and what the run resolved: steps, effective lr, device, versions, ...; after a
    ``--resume`` that changed optimizer or schedule settings, ``run.resume_changes`` lists
    each such resume: its step and the changes, over the run's whole history)."""
    layout = ckpt.RunLayout(run_dir)
    ckpt.atomic_write_text(layout.config_yaml, "# cf train --config config.yaml --out NEW "
                           "repeats this run\n" + to_yaml(cfg))  # fmt: skip
    history = list(((previous or {}).get("run") or {}).get("resume_changes") or [])
    if facts.get("resume_changes"):
        history.append({"step": facts["resumed_from_step"], "changes": facts["resume_changes"]})
    facts = {k: v for k, v in facts.items() if k != "resume_changes"}
    run = {**facts, **({"resume_changes": history} if history else {}),
           "torch_version": torch.__version__, "python_version": platform.python_version()}
    resolved = {**settings(cfg), "run": run}
    ckpt.atomic_write_text(layout.config_json, json.dumps(resolved, indent=2) + "\n")


@dataclass
class PreparedRun:
    """What :func:`train` sets up before step 1 (:func:`prepare_training`'s result)."""

    task: Task
    state: ckpt.TrainState
    train_loader: Any
    plan: dict[str, Any]
    hooks: list[HookBase]
    checkpoints: CheckpointHook
    saved: Saved
    notes: list[str]
    cfg: TrainConfig  # the command's, with the accumulation a world-size change needs


def _build_model(cfg: TrainConfig, task: Task,
                 found: run_folder.Resumable | None) -> tuple[nn.Module, list[str]]:  # fmt: skip
    """The model ``cfg`` names, checked against a resumed checkpoint, with its backbone
    initialised as ``--pretrained`` / ``--backbone-weights`` say; lines to show unless a
    resumed checkpoint replaces these weights."""
    module = task.build_model(cfg.model.name, **cfg.model_overrides())
    if found is not None:
        run_folder.check_same_model(found, module)
    from clusterformer.models import load_backbone_weights

    init_notes = []
    if cfg.model.pretrained:
        count = load_backbone_weights(module, ckpt.resolve_checkpoint(cfg.model.pretrained))
        init_notes.append(f"backbone initialised from {cfg.model.pretrained} ({count} tensors)")
    if cfg.model.backbone.weights:
        count = load_backbone_weights(module, cfg.model.backbone.weights)
        init_notes.append(f"backbone weights from {cfg.model.backbone.weights} ({count} tensors)")
    return module, init_notes


def _build_state(cfg: TrainConfig, env: DistEnv, module: nn.Module, amp: str,
                 plan: dict[str, Any]) -> ckpt.TrainState:  # fmt: skip
    optimizer = build_optimizer(module, lr=plan["lr_effective"],
                                weight_decay=cfg.optim.weight_decay,
                                backbone_lr_mult=cfg.optim.backbone_lr_mult)  # fmt: skip
    schedule = Schedule(plan["total_steps"], plan["warmup_steps"], cfg.schedule.kind,
                        cfg.schedule.min_lr_ratio, cfg.schedule.poly_power)  # fmt: skip
    ema = ckpt.ModelEma(module, cfg.optim.ema_decay) if cfg.optim.ema_decay else None
    return ckpt.TrainState(model=module, module=module, optimizer=optimizer, schedule=schedule,
                           device=env.device, amp=amp, grad_clip=cfg.optim.grad_clip,
                           scaler=make_scaler(amp, env.device), ema=ema)


def _build_hooks(
    cfg: TrainConfig, env: DistEnv, val_loader: Any, meta: dict[str, Any], saved: Saved,
    loggers: Sequence[HookBase],
) -> tuple[list[HookBase], CheckpointHook]:
    """The run's hooks in calling order; the checkpoint hook comes last (it saves every
    other hook's state, after the evaluation of the same step)."""
    spec = task_spec(cfg.task.name)
    checkpoints = CheckpointHook(cfg.runtime.save_every, cfg.runtime.keep_last, meta, saved)
    hooks: list[HookBase] = [*loggers, EmaHook(), LoggingHook(cfg.runtime.log_every)]
    if val_loader is not None:
        best = BestCheckpoint(ckpt.RunLayout(Path(cfg.runtime.out)).checkpoints, spec,
                              cfg.runtime.best_metric or spec.primary_metric,
                              cfg.runtime.patience, meta, is_main=env.is_main)  # fmt: skip
        hooks.append(EvalHook(val_loader, cfg.runtime.eval_every, best))
    hooks.append(checkpoints)
    return hooks, checkpoints


def _find_checkpoint(cfg: TrainConfig, env: DistEnv, run_dir: Path, task: Task,
                     notes: list[str]) -> run_folder.Resumable | None:  # fmt: skip
    """The checkpoint to continue (None: start at step 0), checked to fit ``cfg``, once the
    main rank has tidied the folder."""
    notes += run_folder.tidy(run_dir) if env.is_main else []
    barrier(env)  # the main rank has cleaned the folder before any rank reads it
    if resumes_after_restart(env, run_dir):
        notes.append(f"torchrun restarted the workers: continuing {run_dir} from its newest "
                     "complete checkpoint")  # fmt: skip
    found = run_folder.resumable(run_dir, resume=cfg.runtime.resume,
                                 restart=cfg.runtime.restart, notes=notes)  # fmt: skip
    if found is not None:
        run_folder.check_same_setup(found, task=task.name, model=cfg.model.name,
                                    image_size=cfg.data.image_size,
                                    num_classes=task.num_classes)  # fmt: skip
    return found


def _record_start(cfg: TrainConfig, env: DistEnv, run_dir: Path, prepared: PreparedRun,
                  facts: dict[str, Any], resumed: bool) -> None:  # fmt: skip
    """Note what a resume changed; on the main rank, once everything is checked: clear the
    folder for ``--restart``, check room for a checkpoint, write the config files."""
    state, notes = prepared.state, prepared.notes
    previous = _previous_config(run_dir)
    changes = resume_changes(previous, cfg) if resumed else {}
    notes += [f"--resume: {key} {old} -> {new}, applied from step {state.step}"
              for key, (old, new) in changes.items()]  # fmt: skip
    if not env.is_main:
        return
    if cfg.runtime.restart:
        notes += run_folder.restart(run_dir)
    run_folder.check_room(run_dir, state.module, state.ema is not None)
    _write_config(run_dir, cfg, {
        **prepared.plan, "amp": state.amp, "world_size": env.world_size,
        "device": str(env.device), **facts, "resumed_from_step": state.step if resumed else None,
        "resume_changes": changes,
    }, previous)  # fmt: skip


def prepare_training(cfg: TrainConfig, env: DistEnv, run_dir: Path,
                     loggers: Sequence[HookBase] = ()) -> PreparedRun:  # fmt: skip
    """Everything :func:`train` does before step 1: task, model, data, optimizer, hooks, and a
    resumed checkpoint's state (weights, optimizer, RNG, loader position, each hook's state).

    Benchmarks that time ``engine.step.train_step`` call it to get exactly ``cf train``'s
    setup (``prepared.task``, ``prepared.state``, ``prepared.train_loader``). It writes the run
    folder's config files, as ``cf train`` does, so ``run_dir`` should be a scratch folder."""
    from clusterformer.data import load_dataset_info

    seed_everything(cfg.runtime.seed)  # same init on every rank
    amp = cfg.runtime.amp or ("bf16" if env.device.type == "cuda" else "none")
    make_scaler(amp, env.device)  # fail early with a clear message (fp16 on CPU)
    spec = task_spec(cfg.task.name)
    info = load_dataset_info(cfg.data.train, spec.name)
    task = spec.build(spec.categories(info["categories"]), cfg.task.options)
    notes: list[str] = []
    found = _find_checkpoint(cfg, env, run_dir, task, notes)
    if found is not None:  # another world size: keep the global batch (or refuse)
        cfg, changed = fit_world_size(cfg, found, env.world_size,
                                      int(info.get("num_samples") or 0), _previous_config(run_dir))
        notes += changed
    module, init_notes = _build_model(cfg, task, found)
    module = module.to(env.device)
    normalisation = normalisation_of(module)
    augment = plan_augmentation(cfg, int(info.get("num_samples") or 0))
    train_loader, val_loader = _build_loaders(cfg, env, task, normalisation, augment)
    plan = plan_schedule(cfg, len(train_loader), env.world_size)
    state = _build_state(cfg, env, module, amp, plan)
    meta = checkpoint_metadata(module, task, image_size=cfg.data.image_size,
                               extra={"model_name": cfg.model.name,
                                      "num_classes": task.num_classes},
                               preprocess=augment.eval_record(normalisation))  # fmt: skip
    saved = Saved(found.weights, int(found.state["step"])) if found is not None else Saved()
    hooks, checkpoints = _build_hooks(cfg, env, val_loader, meta, saved, loggers)
    if found is not None:
        state.load_state_dict(found.state, found.weights, rank=env.rank, hooks=hooks)
    else:  # a resumed run restored its RNG; else give each rank its own stream
        seed_everything(cfg.runtime.seed + env.rank + 1)
    state.model = _wrap(module, cfg, env, amp)
    if augment.missing:
        notes.append(f"note: {', '.join(augment.missing)} do not apply to {task.name}'s "
                     f"{spec.data.transform} transforms; training without them")  # fmt: skip
    notes += [f"resumed {run_dir} at step {state.step} (epoch {state.epoch}, batch "
              f"{state.batches_in_epoch})"] if found is not None else init_notes  # fmt: skip
    prepared = PreparedRun(task, state, train_loader, plan, hooks, checkpoints, saved, notes, cfg)
    _record_start(cfg, env, run_dir, prepared, {
        "num_classes": task.num_classes, "transforms_missing": augment.missing,
        "augment": augment.describe()}, resumed=found is not None)  # fmt: skip
    return prepared


def _run(prepared: PreparedRun, cfg: TrainConfig, env: DistEnv, run_dir: Path,
         stop: StopFlag, bars: bool) -> TrainResult:  # fmt: skip
    """Step until the plan's last step (or an early stop), logging to the run folder."""
    plan, state, total = prepared.plan, prepared.state, prepared.plan["total_steps"]
    with RunLogger(run_dir, total, enabled=env.is_main, start_step=state.step,
                   progress=cfg.runtime.progress and bars) as log:  # fmt: skip
        for note in prepared.notes:
            log.message(note)
        log.message(f"plan: {total} steps of {plan['global_batch']} images "
                    f"({total / plan['steps_per_epoch']:.3g} epoch(s) of "
                    f"{plan['steps_per_epoch']} steps), lr {plan['lr_effective']:.3g} "
                    f"({plan['lr_rule']}), warm-up {plan['warmup_steps']} steps; run folder "
                    f"{run_dir}")  # fmt: skip
        for warning in plan["schedule_warnings"]:
            log.message(warning)
        trainer = Trainer(task=prepared.task, state=state, env=env, loader=prepared.train_loader,
                          run_dir=run_dir, total_steps=total, accum_steps=cfg.optim.accum_steps,
                          log=log, stop=stop, saved=prepared.saved, hooks=prepared.hooks)  # fmt: skip
        trainer.run()
    return TrainResult(run_dir, state.step, prepared.checkpoints.last, trainer.metrics,
                       read_best(ckpt.RunLayout(run_dir).checkpoints), trainer.stop_early)  # fmt: skip


def elastic_restart_config(cfg: TrainConfig) -> TrainConfig:
    """``cfg`` for a worker group torchrun's elastic agent restarted after a group of the same
    job had started the run (:func:`~clusterformer.engine.distributed.resumes_after_restart`):
    it continues the run (``--resume``), whatever the first start's flags were. ``--restart`` in
    particular must not apply again, or every restart would delete the progress it exists to
    keep; a first start (restart count 0) still needs ``--resume`` / ``--restart`` to touch a
    folder that holds a checkpoint."""
    again = copy.deepcopy(cfg)
    again.runtime.resume, again.runtime.restart = True, False
    return again


def train(cfg: TrainConfig, *, handle_signals: bool = True, bars: bool = True) -> TrainResult:
    """Run the training ``cfg`` describes; returns the final step, checkpoint and metrics.
    ``bars=False`` turns the live progress bar off for this process only (the command's
    ``--no-progress``); ``runtime.progress``, a setting of the run, is recorded as given.

    Raises:
        TrainingInterrupted: SIGTERM/SIGINT arrived; a checkpoint was saved first.
        ValueError / FileNotFoundError: bad configuration or data.
    """
    run_dir = Path(cfg.runtime.out)
    loggers = build_logger_hooks(cfg.runtime.loggers, cfg.to_dict())  # a missing extra: now
    env = setup_distributed(cfg.runtime.device)
    if resumes_after_restart(env, run_dir):
        cfg = elastic_restart_config(cfg)
    stop = StopFlag()
    lock = contextlib.ExitStack()
    try:
        if env.is_main:  # the one writer of the run folder: a second cf train on it is refused
            lock.enter_context(hold_output(run_dir, "cf train"))
        prepared = prepare_training(cfg, env, run_dir, loggers)
        mark_started(env, run_dir)
        if handle_signals:
            stop.install()
        return _run(prepared, prepared.cfg, env, run_dir, stop, bars)
    finally:
        stop.restore()
        lock.close()
        cleanup_distributed(env)
