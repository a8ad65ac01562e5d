"""The training loop, the same for every task and every launch (1 CPU .. many nodes).

``train(cfg)`` builds data, model and optimizer from a :class:`TrainConfig`, optionally
resumes, then repeats :func:`~clusterformer.engine.step.train_step`, logging, evaluating
and checkpointing on schedule. It knows nothing task-specific: the Task object does.
SIGTERM / SIGINT make it save a checkpoint and raise :class:`TrainingInterrupted`.
"""

from __future__ import annotations

import json
import platform
import random
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from clusterformer.engine import checkpoint as ckpt
from clusterformer.engine import run_folder
from clusterformer.engine.config import TrainConfig
from clusterformer.engine.distributed import (
    DistEnv,
    any_rank,
    barrier,
    cleanup_distributed,
    gather_objects,
    mean_across_ranks,
    setup_distributed,
)
from clusterformer.engine.divergence import TrainingDiverged, unsaveable
from clusterformer.engine.evaluate import checkpoint_metadata, evaluate
from clusterformer.engine.logging import RunLogger
from clusterformer.engine.optim import Schedule, build_optimizer
from clusterformer.engine.signals import StopFlag, TrainingInterrupted
from clusterformer.engine.step import ModelEma, TrainState, make_scaler, train_step
from clusterformer.tasks import Task, get_task


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    checkpoint: Path | None
    metrics: dict[str, float] = field(default_factory=dict)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    torch.backends.cudnn.benchmark = False


def _resolve_amp(cfg: TrainConfig, env: DistEnv) -> str:
    amp = cfg.amp or ("bf16" if env.device.type == "cuda" else "none")
    make_scaler(amp, env.device)  # fail early with a clear message (fp16 on CPU)
    return amp


def _requested_transforms(cfg: TrainConfig) -> dict[str, Any]:
    """Classification-only transforms the config turns on ("none" turns RandAugment off)."""
    spec = (cfg.rand_augment or "").strip()
    wanted: dict[str, Any] = {"rand_augment": spec} if spec.lower() not in ("", "none") else {}
    if cfg.random_erasing:
        wanted["random_erasing"] = float(cfg.random_erasing)
    return wanted


def train_augment_options(cfg: TrainConfig) -> dict[str, Any]:
    """The train loader's ``augment``: ``cfg.augment`` plus, for classification, rand_augment and
    random_erasing; a key also set in ``cfg.augment`` must agree (ValueError otherwise)."""
    options = dict(cfg.augment)
    wanted = _requested_transforms(cfg) if cfg.task == "classification" else {}
    for name, value in wanted.items():
        if options.setdefault(name, value) != value:
            raise ValueError(f"{name} is given twice: {value!r} and augment[{name!r}] = "
                             f"{options[name]!r}; give it once")  # fmt: skip
    return options


def _transforms_missing(cfg: TrainConfig) -> list[str]:
    """Requested transforms this task does not apply (dense tasks skip them)."""
    return [] if cfg.task == "classification" else list(_requested_transforms(cfg))


def _build_loaders(cfg: TrainConfig, env: DistEnv) -> tuple[Any, Any | None]:
    from clusterformer.data import build_loader

    common = {"rank": env.rank, "world_size": env.world_size, "num_workers": cfg.num_workers}
    train_loader = build_loader(
        cfg.data,
        cfg.task,
        batch_size=cfg.batch_size,
        image_size=cfg.image_size,
        train=True,
        seed=cfg.seed,
        augment=train_augment_options(cfg),
        **common,
    )
    val_loader = None
    if cfg.val_data:
        val_loader = build_loader(
            cfg.val_data,
            cfg.task,
            batch_size=cfg.batch_size,
            image_size=cfg.image_size,
            train=False,
            seed=cfg.seed,
            **common,
        )
    return train_loader, val_loader


def _plan(cfg: TrainConfig, batches_per_epoch: int, world_size: int) -> dict[str, Any]:
    steps_per_epoch = max(batches_per_epoch // cfg.accum_steps, 1)
    if cfg.steps is not None:
        total = cfg.steps
    elif cfg.epochs is not None:
        total = max(round(cfg.epochs * steps_per_epoch), 1)
    else:
        raise ValueError("give --steps or --epochs (or a --recipe that sets one)")
    if cfg.warmup_steps is not None:
        warmup = cfg.warmup_steps
    elif cfg.warmup_epochs is not None:
        warmup = round(cfg.warmup_epochs * steps_per_epoch)
    else:
        warmup = 0
    global_batch = cfg.batch_size * world_size * cfg.accum_steps
    lr = cfg.lr * global_batch / cfg.lr_base_batch if cfg.lr_base_batch else cfg.lr
    return {
        "total_steps": total,
        "warmup_steps": min(warmup, max(total - 1, 0)),
        "steps_per_epoch": steps_per_epoch,
        "global_batch": global_batch,
        "lr_effective": lr,
    }


def _training_state(state: TrainState, env: DistEnv) -> dict[str, Any]:
    rngs = gather_objects(ckpt.rng_state(), env)  # collective: every rank calls this
    out: dict[str, Any] = {
        "step": state.step,
        "epoch": state.epoch,
        "batches_in_epoch": state.batches_in_epoch,
        "world_size": env.world_size,
        "optimizer": state.optimizer.state_dict(),
        "scaler": state.scaler.state_dict() if state.scaler is not None else None,
        "rng": rngs,
    }
    if state.ema is not None:  # the safetensors file then holds the EMA weights
        out["model"] = state.module.state_dict()
    return out


@dataclass
class _Saved:
    """The last checkpoint known good: where it is and its step."""

    path: Path | None = None
    step: int = -1


def _save(
    state: TrainState, env: DistEnv, run_dir: Path, meta: dict, cfg: TrainConfig, periodic: bool,
    task: Task, batch: dict | None, saved: _Saved,
) -> Path:  # fmt: skip
    """Commit a checkpoint of ``state`` unless one of this step exists; never one of weights
    that are non-finite or give non-finite outputs on ``batch`` (TrainingDiverged instead).
    Returns ``RUN/checkpoints/last.safetensors``, which now names it."""
    last = run_dir / "checkpoints" / "last.safetensors"
    if state.step == saved.step and saved.path is not None:
        return last if last.exists() else saved.path
    problem = unsaveable(state, task, batch)
    if any_rank(problem is not None, env):
        raise TrainingDiverged(_diverged(run_dir, f"{problem or 'another rank diverged'} at "
                                         f"step {state.step}", saved))  # fmt: skip
    payload = _training_state(state, env)
    path, error = None, None
    if env.is_main:
        weights = state.ema.module if state.ema is not None else state.module
        try:
            path = ckpt.save_checkpoint(
                run_dir / "checkpoints",
                weights=weights,
                metadata=meta,
                state=payload,
                step=state.step,
                periodic=periodic,
                keep_last=cfg.keep_last,
            )
        except OSError as exc:  # e.g. disk full: the previous checkpoint is intact
            error = exc
    if any_rank(error is not None, env):  # every rank stops, none waits on a barrier forever
        raise error or OSError(f"rank 0 could not save the checkpoint of step {state.step}")
    saved.path = path or ckpt.step_weights(run_dir / "checkpoints", state.step)
    saved.step = state.step
    return last


def _diverged(run_dir: Path, problem: str, saved: _Saved) -> str:
    if saved.path is None:
        keep = "no checkpoint saved"
    else:
        where = saved.path.parent if saved.path.name == ckpt.WEIGHTS else saved.path
        shown = where.relative_to(run_dir) if where.is_relative_to(run_dir) else where
        keep = f"kept the last good checkpoint {shown}"
    return f"{run_dir}: training stopped: {problem}; {keep}; lower --lr or set --grad-clip"


def _resume(state: TrainState, env: DistEnv, found: run_folder.Resumable) -> bool:
    weights, saved = found.weights, found.state
    ckpt.load_weights(state.ema.module if state.ema is not None else state.module, weights)
    if state.ema is not None:
        if "model" not in saved:
            raise ValueError(f"{weights}: saved without EMA; resume it without EMA")
        state.module.load_state_dict(saved["model"])
    state.optimizer.load_state_dict(saved["optimizer"])
    if state.scaler is not None and saved.get("scaler"):
        state.scaler.load_state_dict(saved["scaler"])
    state.step, state.epoch = int(saved["step"]), int(saved["epoch"])
    state.batches_in_epoch = int(saved["batches_in_epoch"])
    rngs = saved.get("rng") or []
    if env.rank < len(rngs):
        ckpt.set_rng_state(rngs[env.rank])
    return True


def _wrap(module: nn.Module, cfg: TrainConfig, env: DistEnv, amp: str) -> nn.Module:
    if cfg.grad_checkpointing:
        switches = [m for m in module.modules() if hasattr(m, "set_grad_checkpointing")]
        if not switches:
            raise ValueError(f"--grad-checkpointing: {cfg.model} has no checkpointable stages")
        for switch in switches:
            switch.set_grad_checkpointing(True)
    model: nn.Module = module
    if env.distributed:
        from torch.nn.parallel import DistributedDataParallel

        ids = [env.device.index] if env.device.type == "cuda" else None
        model = DistributedDataParallel(module, device_ids=ids)
    if cfg.compile:
        from clusterformer.engine.compiled import CheckedCompile, compile_model, tolerance_for

        # The first batch also runs eagerly: a compiler bug stops the run with one line.
        model = CheckedCompile(compile_model(model, inference=False), module,
                               tolerance=tolerance_for(amp))
    return model


def _write_config(
    run_dir: Path, cfg: TrainConfig, plan: dict, env: DistEnv, amp: str, extra: dict
) -> None:
    missing = _transforms_missing(cfg)
    resolved = {
        **cfg.to_dict(),
        **plan,
        "amp": amp,
        "world_size": env.world_size,
        "device": str(env.device),
        "transforms_missing": missing,
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        **extra,
    }
    ckpt.atomic_write_text(run_dir / "config.json", json.dumps(resolved, indent=2) + "\n")


def train(
    cfg: TrainConfig, *, task: Task | None = None, handle_signals: bool = True
) -> TrainResult:
    """Run the training ``cfg`` describes; returns the final step, checkpoint and metrics.

    Raises:
        TrainingInterrupted: SIGTERM/SIGINT arrived; a checkpoint was saved first.
        ValueError / FileNotFoundError: bad configuration or data.
    """
    from clusterformer.data import load_dataset_info

    run_dir = Path(cfg.out)
    env = setup_distributed(cfg.device)
    stop = StopFlag()
    try:
        seed_everything(cfg.seed)  # same init on every rank
        amp = _resolve_amp(cfg, env)
        if task is None:
            task = get_task(cfg.task, label_smoothing=cfg.label_smoothing,
                            mixup_alpha=cfg.mixup_alpha, cutmix_alpha=cfg.cutmix_alpha,
                            **cfg.task_options)  # fmt: skip
        info = load_dataset_info(cfg.data)
        categories = info["categories"]
        num_classes = len(categories)
        notes = run_folder.tidy(run_dir) if env.is_main else []
        barrier(env)  # the main rank has cleaned the folder before any rank reads it
        found = run_folder.resumable(run_dir, resume=cfg.resume, restart=cfg.restart, notes=notes)
        if found is not None:
            run_folder.check_same_setup(
                found, task=cfg.task, model=cfg.model, image_size=cfg.image_size,
                num_classes=num_classes,
            )  # fmt: skip
        module = task.build_model(cfg.model, num_classes, **cfg.model_overrides)
        if found is not None:
            run_folder.check_same_model(found, module)
        loaded = ckpt.load_pretrained_backbone(module, cfg.pretrained) if cfg.pretrained else 0
        module = module.to(env.device)
        train_loader, val_loader = _build_loaders(cfg, env)
        if len(train_loader) == 0:
            raise ValueError(
                f"{cfg.data}: fewer samples than one batch of {cfg.batch_size} per process"
            )
        plan = _plan(cfg, len(train_loader), env.world_size)
        optimizer = build_optimizer(
            module,
            lr=plan["lr_effective"],
            weight_decay=cfg.weight_decay,
            backbone_lr_mult=cfg.backbone_lr_mult,
        )
        schedule = Schedule(
            plan["total_steps"],
            plan["warmup_steps"],
            cfg.schedule,
            cfg.min_lr_ratio,
            cfg.poly_power,
        )
        state = TrainState(
            model=module,
            module=module,
            optimizer=optimizer,
            schedule=schedule,
            device=env.device,
            amp=amp,
            grad_clip=cfg.grad_clip,
            scaler=make_scaler(amp, env.device),
            ema=ModelEma(module, cfg.ema_decay) if cfg.ema_decay else None,
        )
        resumed = found is not None and _resume(state, env, found)
        saved = _Saved(found.weights, state.step) if found is not None else _Saved()
        if not resumed:  # a resumed run restored its RNG; else give each rank its own stream
            seed_everything(cfg.seed + env.rank + 1)
        state.model = _wrap(module, cfg, env, amp)
        meta = checkpoint_metadata(
            module,
            task,
            categories=categories,
            image_size=cfg.image_size,
            extra={"model_name": cfg.model, "num_classes": num_classes},
        )
        if env.is_main:
            if cfg.restart:
                notes += run_folder.restart(run_dir)
            run_folder.check_room(run_dir, module, state.ema is not None)
            _write_config(
                run_dir,
                cfg,
                plan,
                env,
                amp,
                {"num_classes": num_classes, "resumed_from_step": state.step if resumed else None},
            )
        if handle_signals:
            stop.install()
        metrics: dict[str, float] = {}
        total = plan["total_steps"]
        last_path: Path | None = None
        with RunLogger(run_dir, total, enabled=env.is_main, start_step=state.step) as log:
            for note in notes:
                log.message(note)
            missing = _transforms_missing(cfg)
            if missing:
                log.message(
                    f"note: {', '.join(missing)} apply to classification only; "
                    f"training {cfg.task} without them"
                )
            if loaded and not resumed:
                log.message(f"backbone initialised from {cfg.pretrained} ({loaded} tensors)")
            if resumed:
                log.message(
                    f"resumed {run_dir} at step {state.step} (epoch {state.epoch}, "
                    f"batch {state.batches_in_epoch})"
                )
            images_seen, t_last = 0, time.perf_counter()
            last_batch: dict | None = None
            while state.step < total:
                train_loader.set_epoch(state.epoch)
                group: list[dict] = []
                for index, batch in enumerate(train_loader):
                    if index < state.batches_in_epoch:
                        continue  # resume mid-epoch: skip what the saved run consumed
                    group.append(batch)
                    if len(group) < cfg.accum_steps:
                        continue
                    try:
                        scalars = train_step(state, task, group)
                    except FloatingPointError as exc:
                        problem = str(exc).split(";")[0]
                        raise TrainingDiverged(_diverged(run_dir, problem, saved)) from None
                    last_batch = group[-1]
                    state.batches_in_epoch = index + 1
                    images_seen += sum(b["images"].shape[0] for b in group) * env.world_size
                    group = []
                    if state.step % cfg.log_every == 0 or state.step == total:
                        now = time.perf_counter()
                        scalars = mean_across_ranks(scalars, env)
                        scalars["img_per_s"] = images_seen / max(now - t_last, 1e-9)
                        scalars["epoch"] = state.epoch
                        if env.device.type == "cuda":  # detectron2's max_mem, in GiB
                            scalars["max_mem_gib"] = torch.cuda.max_memory_allocated(env.device) / 2**30
                        images_seen, t_last = 0, now
                        log.log_train(state.step, scalars)
                    if (
                        val_loader is not None
                        and cfg.eval_every
                        and state.step % cfg.eval_every == 0
                        and state.step < total
                    ):
                        metrics = _run_eval(state, task, val_loader, num_classes, categories, log)
                        t_last = time.perf_counter()
                    if cfg.save_every and state.step % cfg.save_every == 0:
                        last_path = _save(state, env, run_dir, meta, cfg, True, task, last_batch,
                                          saved)  # fmt: skip
                    if any_rank(stop.signum is not None, env):
                        path = _save(state, env, run_dir, meta, cfg, False, task, last_batch, saved)
                        log.message(f"stopping on signal at step {state.step}; checkpoint {path}")
                        raise TrainingInterrupted(stop.signum or signal.SIGTERM, state.step, path)
                    if state.step >= total:
                        break
                else:
                    state.epoch += 1
                    state.batches_in_epoch = 0
            last_path = _save(state, env, run_dir, meta, cfg, False, task, last_batch, saved)
            if val_loader is not None:
                metrics = _run_eval(state, task, val_loader, num_classes, categories, log)
        return TrainResult(run_dir, state.step, last_path, metrics)
    finally:
        stop.restore()
        cleanup_distributed(env)


def _run_eval(
    state: TrainState,
    task: Task,
    loader: Any,
    num_classes: int,
    categories: list[dict],
    log: RunLogger,
) -> dict[str, float]:
    model = state.ema.module if state.ema is not None else state.module
    metrics = evaluate(
        model,
        task,
        loader,
        num_classes=num_classes,
        device=state.device,
        amp=state.amp,
        categories=categories,
    )
    log.log_eval(state.step, metrics)
    return metrics
