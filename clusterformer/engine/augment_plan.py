"""The training augmentation and evaluation preprocessing a run uses, chosen from its config and
its data (:mod:`clusterformer.data.augment_policy`): one function, called by ``cf train``'s
start line and by the training loop, so what is printed is what runs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from clusterformer.data.augment_policy import choose_image_augment, peek_images
from clusterformer.data.preprocess import EvalPreprocess, default_eval_preprocess
from clusterformer.engine.config import TrainConfig
from clusterformer.tasks import task_spec


@dataclass(frozen=True)
class AugmentPlan:
    """``train``: the train transform's options; ``missing``: set options that do not apply to
    the task's transform kind; ``native``: evaluate without a centre crop; ``why``: what the
    automatic choice was based on (empty when nothing was chosen automatically)."""

    kind: str
    image_size: int
    train: dict[str, Any]
    missing: list[str]
    native: bool = False
    why: str = ""

    def eval_record(self, normalisation: dict[str, Any]) -> EvalPreprocess:
        """The evaluation preprocessing record for a model with this ``{"mean", "std"}``."""
        return default_eval_preprocess(self.kind, self.image_size, native=self.native,
                                       **normalisation)  # fmt: skip

    def describe(self) -> str:
        """One phrase for the start line, e.g. ``augment: crop 35-100 % area, flip; eval 32x32,
        no crop (32 px images (< 64 px))``."""
        opts = self.train
        parts = []
        if "scale" in opts:
            low, high = opts["scale"]
            parts.append(f"crop {low * 100:.0f}-{high * 100:.0f} % area")
        if "scale_range" in opts:
            parts.append(f"scale jitter {opts['scale_range'][0]:g}-{opts['scale_range'][1]:g}")
        parts.append("flip" if opts.get("flip", True) else "no flip")
        if opts.get("rand_augment"):
            parts.append(str(opts["rand_augment"]))
        if opts.get("random_erasing"):
            parts.append(f"erasing {opts['random_erasing']:g}")
        record = self.eval_record({"mean": (0.0,) * 3, "std": (1.0,) * 3}).describe()
        why = f" ({self.why})" if self.why else ""
        return f"augment: {', '.join(parts)}; eval {record}{why}"


def augment_options(cfg: TrainConfig, kind: str) -> tuple[dict[str, Any], list[str]]:
    """The train transform's options set in ``data.augment`` and the set ones that do not
    apply to the task's transform ``kind`` (they are left out, with a note)."""
    from clusterformer.data.transforms import TRAIN_OPTIONS

    given = {k: v for k, v in cfg.to_dict()["data"]["augment"].items() if v is not None}
    if str(given.get("rand_augment", "")).strip().lower() == "none":
        given.pop("rand_augment")
    applies = set(TRAIN_OPTIONS[kind])
    return ({k: v for k, v in given.items() if k in applies},
            [k for k in given if k not in applies])  # fmt: skip


def plan_augmentation(cfg: TrainConfig, num_samples: int | None = None) -> AugmentPlan:
    """What ``cfg`` trains with: the options it sets, and for ``"image"`` transforms the crop
    scale and flip (unless set) and the eval rule chosen from the training images' size, count
    and mirror asymmetry
    (``num_samples``: the training set's size, read from its dataset.json when None)."""
    spec = task_spec(cfg.task.name)
    kind, size = spec.data.transform, cfg.data.image_size
    options, missing = augment_options(cfg, kind)
    if kind != "image" or cfg.data.train is None:
        return AugmentPlan(kind, size, options, missing)
    peek = peek_images(cfg.data.train, spec.name)
    if not peek.sizes:  # nothing decodes: the loader reports the bad sample by name
        return AugmentPlan(kind, size, options, missing)
    if num_samples is None:
        from clusterformer.data import load_dataset_info

        num_samples = int(load_dataset_info(cfg.data.train, spec.name).get("num_samples") or 0)
    asymmetry = peek.mirror_asymmetry if cfg.data.augment.flip is None else None  # set: kept
    choice = choose_image_augment(peek.sizes, num_samples, size, asymmetry)
    options = {"scale": list(choice.scale), "flip": choice.flip, **options}
    return AugmentPlan(kind, size, options, missing, choice.native, choice.why)
