"""``cf quickstart``: synthetic data -> shards -> train nano on CPU -> evaluate -> pictures.

Two demos share one path. ``panoptic`` (the default) does what a COCO model does: a
classification run on single-shape images is its "ImageNet" pretraining, then a panoptic
model starts from that backbone (``--pretrained``) and learns scenes of things over stuff.
``classification`` stops after the first half. Held-out numbers of both are in
docs/benchmarks.md.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import typer

from clusterformer.cli.errors import DataError, UserError

# The two halves: the recipe of the pretraining (first) half and of the scene half; the demos
# (--task) are named after the tasks the recipes train.
PRETRAIN_RECIPE, SCENE_RECIPE = "shapes", "shapes-panoptic"


def recipe_task(recipe: str) -> str:
    from clusterformer.engine.config_files import read_recipe

    return read_recipe(recipe)["task"]["name"]


def register(app: typer.Typer) -> None:
    app.command("quickstart")(quickstart_command)


def quickstart_command(
    out: Path = typer.Option(
        Path("cf-quickstart"), "--out", help="Folder for the data, shards and runs (created)."
    ),
    task: str | None = typer.Option(
        None, "--task", help="Demo: 'panoptic' (default: a classification run on "
        "single-shape images as pretraining, then panoptic segmentation of scenes of things "
        "over stuff) or 'classification' (the first half only, about 7 minutes)."),
    num_train: int = typer.Option(
        16384, "--num-train", min=8, help="Synthetic classification images (64 px)."
    ),
    num_scenes: int = typer.Option(
        2048, "--num-scenes", min=8, help="Synthetic training scenes (panoptic demo)."
    ),
    num_val: int = typer.Option(
        512, "--num-val", min=4, help="Held-out images (a different seed); scenes use a "
        "quarter of it (at least 4)."),
    steps: int | None = typer.Option(
        None, "--steps", help="Training steps of the demo's task (default: its recipe's)."
    ),
    pretrain_steps: int | None = typer.Option(
        None, "--pretrain-steps", help="Classification steps before the panoptic run "
        "(default: the shapes recipe's)."),
    image_size: int | None = typer.Option(
        None, "--image-size", help="Training size (default: the recipes')."
    ),
    seed: int = typer.Option(0, "--seed", help="Seed for data and training."),
    device: str | None = typer.Option(
        "cpu", "--device", help="Device to train on (default cpu)."
    ),
) -> None:
    """Synthetic shapes -> shards -> train nano -> held-out metrics and pictures (minutes).

    Both demos first train a classifier: OUT/shapes-{train,val}, OUT/shards-{train,val},
    OUT/run and OUT/predictions (held-out images with the predicted classes drawn on).
    The panoptic demo (default) goes on from its backbone: OUT/scenes-{train,val},
    OUT/scene-shards-{train,val}, OUT/panoptic-run and OUT/panoptic-predictions (held-out
    scenes with their segments drawn on). OUT/metrics.json holds the held-out metrics of
    every stage.
    """
    from rich.console import Console

    from clusterformer.cli.runtime_opts import start_compute

    first, scenes = recipe_task(PRETRAIN_RECIPE), recipe_task(SCENE_RECIPE)
    task = task or scenes
    if task not in (scenes, first):
        raise UserError(f"--task must be one of {scenes}, {first}, got '{task}'")
    demo = _Demo(out, task == scenes, num_train, num_scenes, num_val, steps, pretrain_steps,
                 image_size, seed, device)  # fmt: skip
    start_compute(device)
    _refuse_trained_runs(demo.run_dirs)
    console = Console()
    t0 = time.perf_counter()
    ckpt = _run_stages(demo, _Stages(console, 6 if demo.both else 3))
    console.print(f"done in {time.perf_counter() - t0:.0f} s; checkpoint: {ckpt}")
    shards = out / ("scene-shards-val" if demo.both else "shards-val")
    console.print(f"  evaluate again: cf eval --ckpt {demo.run_dirs[-1]} --data {shards}")
    console.print(f"  predict: cf predict --ckpt {demo.run_dirs[-1]} IMAGE... --out DIR")


@dataclass(frozen=True)
class _Demo:
    """One quickstart's settings (its flags); ``both``: the panoptic demo (pretraining, then
    scenes), else the classification half only."""

    out: Path
    both: bool
    num_train: int
    num_scenes: int
    num_val: int
    steps: int | None
    pretrain_steps: int | None
    image_size: int | None
    seed: int
    device: str | None

    @property
    def run_dirs(self) -> list[Path]:
        """The run folders it trains, in order."""
        return [self.out / "run"] + ([self.out / f"{recipe_task(SCENE_RECIPE)}-run"]
                                     if self.both else [])  # fmt: skip


def _refuse_trained_runs(run_dirs: list[Path]) -> None:
    from clusterformer.engine.checkpoint import RunLayout

    for run_dir in run_dirs:
        if RunLayout(run_dir).last_weights.exists():
            raise DataError(
                f"{run_dir} already holds a trained model; remove it or choose another --out"
            )


def _run_stages(demo: _Demo, step: _Stages) -> Path:
    """Every stage of ``demo`` under the output lock; writes OUT/metrics.json and returns
    the last checkpoint."""
    from clusterformer.data.output_lock import hold_output
    from clusterformer.engine.files import atomic_write_json

    first, scenes = recipe_task(PRETRAIN_RECIPE), recipe_task(SCENE_RECIPE)
    out, both = demo.out, demo.both
    metrics: dict[str, Any] = {}
    with hold_output(out, "cf quickstart"):  # its steps lock their own folders inside
        ckpt, metrics[first] = _pretrain(out, step, demo.num_train, demo.num_val,
                                         demo.pretrain_steps if both else demo.steps,
                                         None if both else demo.image_size, demo.seed,
                                         demo.device)  # fmt: skip
        if both:
            ckpt, metrics[scenes] = _scenes(out, step, ckpt, demo.num_scenes,
                                            max(demo.num_val // 4, 4), demo.steps,
                                            demo.image_size, demo.seed, demo.device)  # fmt: skip
        atomic_write_json(out / "metrics.json", metrics if both else metrics[first])
    return ckpt


class _Stages:
    """Numbered progress lines: ``[i/n] message``."""

    def __init__(self, console: Any, total: int) -> None:
        self.console, self.total, self.index = console, total, 0

    def __call__(self, message: str) -> None:
        self.index += 1
        self.console.print(f"[{self.index}/{self.total}] {message}")

    def status(self, message: str) -> Any:
        return self.console.status(f"[{self.index + 1}/{self.total}] {message}")


# half -> (raw folder prefix, shard folder prefix, make_shapes kind, shard format, make_shapes
# options). The scenes' things are drawn larger, apart and in contrasting colours (radius 15-30 % of the
# side): a 64-px nano predicts 16x16 masks and cannot outline the default 5-28 px, partly
# covered things, and a thing whose colour matches the ground beneath is barely there.
_DATA: dict[str, tuple[str, str, str, str, dict[str, Any]]] = {
    "pretrain": ("shapes", "shards", "classes", "imagefolder", {}),
    "scenes": ("scenes", "scene-shards", "scenes", "coco-panoptic",
               {"thing_scale": (0.15, 0.3), "occlusion": False, "contrast": True}),
}


def _shards(out: Path, kind: str, counts: dict[str, int], seed: int,
            step: _Stages) -> dict[str, Path]:  # fmt: skip
    """Make and shard the synthetic data of one half ("pretrain" or "scenes") per split."""
    from clusterformer.data.formats import open_source
    from clusterformer.data.shapes import make_shapes
    from clusterformer.data.shards import write_shards

    t0 = time.perf_counter()
    raw_prefix, shard_prefix, shapes_kind, source_format, options = _DATA[kind]
    shards: dict[str, Path] = {}
    for split, split_seed in (("train", seed), ("val", seed + 1000)):
        raw, shard_dir = out / f"{raw_prefix}-{split}", out / f"{shard_prefix}-{split}"
        with step.status(f"making {counts[split]} {split} {kind} images in {raw}"):
            made = make_shapes(raw, num_images=counts[split], image_size=64, seed=split_seed,
                               kinds=(shapes_kind,), **options)  # fmt: skip
            if source_format == "imagefolder":
                source = open_source(source_format, Path(made["classes"]))
            else:
                source = open_source(source_format, made["images"], made["panoptic_json"],
                                     made["panoptic_masks"])  # fmt: skip
            write_shards(source, shard_dir, samples_per_shard=1024, shuffle=True, seed=split_seed)
        shards[split] = shard_dir
    step(f"{shapes_kind} data ready in {time.perf_counter() - t0:.0f} s: {shards['train']}, "
         f"{shards['val']}")  # fmt: skip
    return shards


def _train(cfg: Any, console: Any) -> Any:
    from clusterformer.engine.loop import TrainingInterrupted, train

    try:
        return train(cfg)
    except TrainingInterrupted as exc:
        console.print(f"interrupted: {exc}")
        raise typer.Exit(exc.exit_code) from None


def _config(recipe: str, shards: dict[str, Path], run: Path, steps: int | None,
            image_size: int | None, seed: int, device: str | None, **more: Any) -> Any:  # fmt: skip
    from clusterformer.engine.config_files import resolve_config

    return resolve_config(recipe, overrides={
        "data.train": str(shards["train"]), "data.val": str(shards["val"]), "runtime.out": str(run),
        "schedule.steps": steps, "data.image_size": image_size, "runtime.seed": seed,
        "runtime.device": device, **more})


def _train_stage(step: _Stages, cfg: Any, what: str) -> tuple[Any, dict, float]:
    """Announce and run one training: (its result, its final metrics, seconds taken)."""
    step(f"training {cfg.model.name} {what} for {cfg.schedule.steps} steps at "
         f"{cfg.data.image_size} px")  # fmt: skip
    t0 = time.perf_counter()
    result = _train(cfg, step.console)
    return result, dict(result.metrics), time.perf_counter() - t0


def _pretrain(out: Path, step: _Stages, num_train: int, num_val: int, steps: int | None,
              image_size: int | None, seed: int, device: str | None) -> tuple[Path, dict]:  # fmt: skip
    from clusterformer.cli.predict_cmd import predict_images

    shards = _shards(out, "pretrain", {"train": num_train, "val": num_val}, seed, step)
    cfg = _config(PRETRAIN_RECIPE, shards, out / "run", steps, image_size, seed, device)
    result, metrics, seconds = _train_stage(step, cfg, cfg.task.name)
    # Top-1 only: with 4 classes every image's class is among the top 5 (cf eval's table too).
    step(f"held-out ({metrics.get('num_samples')} images): top-1 {metrics.get('top1', 0):.2f} %; "
         f"training {seconds:.0f} s")  # fmt: skip
    classes = sorted(p for p in (out / "shapes-val" / "classes").iterdir() if p.is_dir())
    examples = [image for folder in classes for image in sorted(folder.glob("*.jpg"))[:2]]
    predict_images(result.checkpoint, examples, out / "predictions", device=device)
    step.console.print(f"      predictions drawn on {len(examples)} held-out images: "
                       f"{out / 'predictions'}")  # fmt: skip
    return result.checkpoint, metrics


def _scenes(out: Path, step: _Stages, pretrained: Path, num_scenes: int, num_val: int,
            steps: int | None, image_size: int | None, seed: int,
            device: str | None) -> tuple[Path, dict]:  # fmt: skip
    from clusterformer.cli.predict_cmd import predict_images

    shards = _shards(out, "scenes", {"train": num_scenes, "val": num_val}, seed, step)
    task = recipe_task(SCENE_RECIPE)
    cfg = _config(SCENE_RECIPE, shards, out / f"{task}-run", steps, image_size, seed, device,
                  **{"model.pretrained": str(pretrained)})  # fmt: skip
    result, m, seconds = _train_stage(step, cfg, f"{task} from the pretrained backbone")
    step(f"held-out ({m.get('num_images', 0):.0f} scenes): PQ {m.get('PQ', 0):.2f} "
         f"(things {m.get('PQ_th', 0):.2f}, stuff {m.get('PQ_st', 0):.2f}), SQ "
         f"{m.get('SQ', 0):.2f}, RQ {m.get('RQ', 0):.2f}; training {seconds:.0f} s")  # fmt: skip
    examples = sorted((out / "scenes-val" / "images").glob("*.jpg"))[:8]
    predict_images(result.checkpoint, examples, out / f"{task}-predictions", device=device)
    step.console.print(f"      segments drawn on {len(examples)} held-out scenes: "
                       f"{out / f'{task}-predictions'}")  # fmt: skip
    return result.checkpoint, m
