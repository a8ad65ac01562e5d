"""Training configuration: defaults, named recipes, and resolution (defaults <- recipe <- flags).

Every CLI flag defaults to ``None`` meaning "not given", so a recipe can set it and an
explicit flag always wins. The resolved configuration is written to ``RUN/config.json``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

AMP_MODES: tuple[str, ...] = ("bf16", "fp16", "none")


@dataclass
class TrainConfig:
    """Everything a training run needs. ``batch_size`` is per process (per GPU); the global
    batch is ``batch_size * world_size * accum_steps``."""

    task: str = "classification"
    data: str = ""
    out: str = ""
    val_data: str | None = None
    model: str = "clusterformer-nano"
    model_overrides: dict[str, Any] = field(default_factory=dict)
    # A checkpoint (any task, same preset) whose backbone initialises this model.
    pretrained: str | None = None
    # Options of the task (tasks.get_task), e.g. a segmentation recipe's num_points.
    task_options: dict[str, Any] = field(default_factory=dict)
    steps: int | None = None
    epochs: float | None = None
    batch_size: int = 32
    accum_steps: int = 1
    image_size: int = 224
    # Learning rate. When ``lr_base_batch`` is set, ``lr`` is the rate for that global batch
    # and is scaled linearly to the actual global batch (the paper's rule).
    lr: float = 1e-3
    lr_base_batch: int | None = None
    weight_decay: float = 0.05
    backbone_lr_mult: float = 1.0
    schedule: str = "cosine"
    min_lr_ratio: float = 0.01
    poly_power: float = 0.9
    warmup_steps: int | None = None
    warmup_epochs: float | None = None
    grad_clip: float | None = None
    amp: str | None = None  # None: bf16 on CUDA, none on CPU
    compile: bool = False
    # Recompute each backbone stage's activations in backward (less memory, more compute).
    grad_checkpointing: bool = False
    ema_decay: float | None = None
    seed: int = 0
    device: str | None = None
    num_workers: int = 0
    save_every: int | None = None
    keep_last: int = 3
    eval_every: int | None = None
    log_every: int = 10
    resume: bool = False
    restart: bool = False  # delete the run folder's checkpoints and logs, start at step 0
    # Task options (classification).
    label_smoothing: float = 0.1
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    # Training augmentation options for the loader (see data.transforms.make_transform);
    # RandAugment and random erasing apply to classification only (config.json lists them
    # under "transforms_missing" for other tasks).
    augment: dict[str, Any] = field(default_factory=dict)
    rand_augment: str | None = None
    random_erasing: float = 0.0
    recipe: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


RECIPES: dict[str, dict[str, Any]] = {
    # The paper's ImageNet-1K setting (DeiT-style): AdamW lr 1e-3 per 1024 images (scaled
    # linearly to the real global batch), wd 0.05, 300 epochs with 20 warm-up epochs, clip 5,
    # smoothing 0.1, mixup 0.8 / cutmix 1.0, 224 px, RandAugment rand-m9-mstd0.5-inc1 and
    # random erasing 0.25 (timm's semantics, data/rand_augment.py; classification only). The
    # eval resize is the loader's 256/224 ratio (256 px for 224) rather than the paper's 248.
    "imagenet-1k": {
        "model": "clusterformer-tiny",
        "epochs": 300,
        "warmup_epochs": 20,
        "batch_size": 128,
        "lr": 1e-3,
        "lr_base_batch": 1024,
        "weight_decay": 0.05,
        "schedule": "cosine",
        "min_lr_ratio": 1e-3,
        "grad_clip": 5.0,
        "label_smoothing": 0.1,
        "mixup_alpha": 0.8,
        "cutmix_alpha": 1.0,
        "image_size": 224,
        "ema_decay": None,
        "rand_augment": "rand-m9-mstd0.5-inc1",
        "random_erasing": 0.25,
        "save_every": 5000,
        "eval_every": 5000,
        "log_every": 50,
    },
    # The paper's COCO detection setting (mmdetection, DINO-style): AdamW lr 1e-4 for a global
    # batch of 16, backbone lr x 0.1, wd 0.05, 50 epochs, multi-scale training (the loader's
    # 0.5-2.0 scale jitter + crop at 1024), clip 0.1. Use with --task detection.
    "coco-detection": {
        "model": "clusterformer-small",
        "epochs": 50,
        "batch_size": 2,
        "lr": 1e-4,
        "lr_base_batch": 16,
        "backbone_lr_mult": 0.1,
        "weight_decay": 0.05,
        "schedule": "cosine",
        "min_lr_ratio": 0.01,
        "warmup_steps": 1000,
        "grad_clip": 0.1,
        "image_size": 1024,
        "save_every": 5000,
        "eval_every": 20000,
        "log_every": 50,
    },
    # The paper's COCO panoptic / instance settings (Mask2Former's): AdamW lr 1e-4 for a global
    # batch of 16, backbone lr x 0.1, wd 0.05, 50 epochs, 100 queries (the segmenter's default),
    # large-scale jitter (scale 0.1-2.0, crop 1024), clip 0.01. Mask2Former steps the lr down
    # at 89 % and 96 % of training; the closest schedule here is cosine.
    # Use with --task panoptic / --task instance.
    "coco-panoptic": {
        "model": "clusterformer-small",
        "epochs": 50,
        "batch_size": 2,
        "lr": 1e-4,
        "lr_base_batch": 16,
        "backbone_lr_mult": 0.1,
        "weight_decay": 0.05,
        "schedule": "cosine",
        "min_lr_ratio": 0.01,
        "warmup_steps": 10,
        "grad_clip": 0.01,
        "image_size": 1024,
        "augment": {"scale_range": [0.1, 2.0]},
        "save_every": 5000,
        "eval_every": 20000,
        "log_every": 50,
    },
    # ADE20K semantic (Mask2Former's): 160k iterations at a global batch of 16, crop 512
    # (scale jitter 0.5-2.0), poly schedule (power 0.9), AdamW lr 1e-4, backbone x 0.1, clip 0.01.
    "ade20k-semantic": {
        "model": "clusterformer-small",
        "steps": 160000,
        "batch_size": 2,
        "lr": 1e-4,
        "lr_base_batch": 16,
        "backbone_lr_mult": 0.1,
        "weight_decay": 0.05,
        "schedule": "poly",
        "poly_power": 0.9,
        "min_lr_ratio": 0.0,
        "warmup_steps": 0,
        "grad_clip": 0.01,
        "image_size": 512,
        "augment": {"scale_range": [0.5, 2.0]},
        "save_every": 5000,
        "eval_every": 16000,
        "log_every": 50,
    },
    # Synthetic shapes (cf make-shapes): small images, short schedule, no mixing.
    "shapes": {
        # cf quickstart: 16k single-shape images at 64 px, 2500 steps (~5 epochs) on 2 CPU
        # cores. Fresh images matter more than epochs here (3k images x 16 epochs: 66 %), and
        # lr 1.5e-3 beat 3e-3 and 6e-3 (docs/benchmarks.md). No crop (a crop cuts the shape
        # the label names), h-flip only.
        "model": "clusterformer-nano",
        "steps": 2500,
        "warmup_steps": 50,
        "batch_size": 32,
        "lr": 1.5e-3,
        "weight_decay": 0.05,
        "schedule": "cosine",
        "min_lr_ratio": 0.01,
        "grad_clip": 1.0,
        "label_smoothing": 0.1,
        "image_size": 64,
        "augment": {"scale": [1.0, 1.0], "ratio": [1.0, 1.0]},
        "log_every": 50,
        "eval_every": 500,
    },
    # cf quickstart's panoptic half: nano on 64 px synthetic scenes, started from the
    # classification half's backbone (--pretrained). 20 centers (a scene has at most ~9
    # segments) and 1024 sampled points (a 64 px mask has 4096 pixels) keep it CPU-sized.
    # Measured on held-out scenes (docs/benchmarks.md): learned centers ("free", as
    # Mask2Former's queries) name more things than encoder-selected ones; class loss (and
    # matching cost) weight 5, not Mask2Former's 2, at which the class loss stays near 1.0 and
    # no thing is named; the pretrained backbone moves at a tenth of the rate.
    "shapes-panoptic": {
        "model": "clusterformer-nano",
        "model_overrides": {"num_queries": 20, "query_init": "free"},
        "task_options": {"num_points": 1024, "class_weight": 5.0},
        "steps": 1200,
        "batch_size": 8,
        "lr": 1e-3,
        "backbone_lr_mult": 0.1,
        "weight_decay": 0.05,
        "schedule": "cosine",
        "min_lr_ratio": 0.01,
        "image_size": 64,
        "augment": {"scale_range": [1.0, 1.0]},
        "log_every": 50,
        "eval_every": 600,
    },
}


RECIPES["coco-instance"] = dict(RECIPES["coco-panoptic"])


def resolve_config(recipe: str | None = None, **flags: Any) -> TrainConfig:
    """Defaults, then the recipe's values, then every flag that is not ``None``.

    ``--steps`` and ``--epochs`` are one choice: an explicit one clears the recipe's other.
    An explicit ``lr`` is taken as the actual rate (the recipe's linear scaling is dropped).
    """
    known = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(flags) - known)
    if unknown:
        raise ValueError(f"unknown training option(s): {', '.join(unknown)}")
    values: dict[str, Any] = {}
    if recipe is not None:
        if recipe not in RECIPES:
            raise ValueError(f"unknown recipe '{recipe}'; choose one of {', '.join(RECIPES)}")
        values.update(RECIPES[recipe])
        values["recipe"] = recipe
    given = {k: v for k, v in flags.items() if v is not None}
    if given.get("steps") is not None and given.get("epochs") is not None:
        raise ValueError("give either --steps or --epochs, not both")
    if "steps" in given:
        values.pop("epochs", None)
    if "epochs" in given:
        values.pop("steps", None)
    if "lr" in given:
        values["lr_base_batch"] = None
    values.update(given)
    cfg = TrainConfig(**values)
    validate(cfg)
    return cfg


def validate(cfg: TrainConfig) -> None:
    """Raise ValueError naming the option when a setting is out of range."""
    if cfg.amp is not None and cfg.amp not in AMP_MODES:
        raise ValueError(f"--amp must be one of {', '.join(AMP_MODES)}, got '{cfg.amp}'")
    for name in ("batch_size", "accum_steps", "image_size", "keep_last", "log_every"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"{name.replace('_', '-')} must be >= 1, got {getattr(cfg, name)}")
    for name in ("steps", "save_every", "eval_every", "warmup_steps"):
        value = getattr(cfg, name)
        if value is not None and value < (0 if name == "warmup_steps" else 1):
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {value}")
    if cfg.epochs is not None and cfg.epochs <= 0:
        raise ValueError(f"--epochs must be positive, got {cfg.epochs}")
    if cfg.lr <= 0:
        raise ValueError(f"--lr must be positive, got {cfg.lr}")
    if cfg.ema_decay is not None and not 0.0 < cfg.ema_decay < 1.0:
        raise ValueError(f"ema decay must be in (0, 1), got {cfg.ema_decay}")
