"""Segmentation acceptance run: overfit nano on 16 synthetic-shapes images per task, then score.

    python benchmarks/overfit_segmentation.py --out /tmp/cf-overfit-seg [--tasks panoptic semantic instance]
        [--steps 200] [--threads 2] [--num-points 1024] [--image-size 64] [--num-queries 20]

Makes the images (``cf make-shapes``), shards them in each task's format (COCO instances, COCO
panoptic, ADE20K semantic), then trains with the engine's own optimizer, schedule and
``train_step`` and scores with the engine's ``evaluate`` (the task's evaluator: segm AP, mIoU,
PQ) on the same 16 images at ``--eval-image-size`` (default: the training size). The evaluator
writes its predictions at the ORIGINAL 128 px (OUT/<task>.segm.json, OUT/<task>.semantic/,
OUT/<task>.panoptic.json + PNGs) and they are re-scored against the dataset's full-resolution
ground truth with ``cf eval --predictions``'s scorers ("full_res": the acceptance numbers; the
evaluator's own numbers use ground truth resized to the eval size and back). Overfitting means fitting these exact images, so batches come from
the loader's eval transform (no jitter or crop), reshuffled every epoch. Prints steps, wall time
and metrics as JSON (also OUT/overfit-<task>.json); the weights go to OUT/<task>.pt.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

from overfit_detection import batch_as_sample  # this folder: the scripts run from it

SOURCES = {"instance": "coco", "panoptic": "coco-panoptic", "semantic": "ade20k"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--tasks", nargs="+", default=["panoptic", "semantic", "instance"],
                        choices=sorted(SOURCES))
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=64, help="training size")
    parser.add_argument("--eval-image-size", type=int, default=None,
                        help="evaluation size (default: --image-size; 128 = the source size)")
    parser.add_argument("--num-queries", type=int, default=20,
                        help="centers (nano's preset has 100; 0 keeps the preset)")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--num-points", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-only", action="store_true", help="save weights, score later")
    parser.add_argument("--eval-only", action="store_true", help="score OUT/<task>.pt")
    args = parser.parse_args()

    import torch

    from clusterformer.data import make_shapes, open_source, write_shards

    torch.set_num_threads(args.threads)
    made = make_shapes(args.out / "shapes", num_images=16, image_size=128, seed=args.seed)
    sources = {
        "instance": lambda: open_source("coco", made["images"], made["instances"]),
        "panoptic": lambda: open_source("coco-panoptic", made["images"], made["panoptic_json"],
                                        made["panoptic_masks"]),
        "semantic": lambda: open_source("ade20k", made["images"], made["classes_json"],
                                        made["semantic_masks"]),
    }
    for name in args.tasks:
        shards = args.out / f"shards-{name}"
        info = write_shards(sources[name](), shards, samples_per_shard=16)
        report = overfit(name, shards, info["categories"], args)
        print(json.dumps(report, indent=2), flush=True)
        (args.out / f"overfit-{name}.json").write_text(json.dumps(report, indent=2) + "\n")


def overfit(name: str, shards: Path, categories: list[dict], args: argparse.Namespace) -> dict:
    import torch

    from clusterformer.data import LoaderSpec, build_loader
    from clusterformer.data.collate import collate
    from clusterformer.engine.evaluate import evaluate
    from clusterformer.engine.optim import Schedule, build_optimizer
    from clusterformer.engine.step import TrainState, train_step
    from clusterformer.tasks import build_task

    torch.manual_seed(args.seed)
    task = build_task(name, categories, num_points=args.num_points)
    overrides = {"num_queries": args.num_queries} if args.num_queries else {}
    model = task.build_model("clusterformer-nano", **overrides)
    state = TrainState(
        model=model, module=model,
        optimizer=build_optimizer(model, lr=args.lr, weight_decay=0.05),
        schedule=Schedule(args.steps, 20, "cosine", 0.01), device=torch.device("cpu"),
        grad_clip=1.0,
    )
    single = build_loader(str(shards), name,
                          LoaderSpec(batch_size=1, image_size=args.image_size, train=False))
    samples = [batch_as_sample(b) for b in single]
    single = build_loader(str(shards), name, LoaderSpec(batch_size=1,
                          image_size=args.eval_image_size or args.image_size, train=False))
    rng = random.Random(args.seed)
    history, start, eval_s = [], time.perf_counter(), 0.0
    def score() -> dict:
        return _score(evaluate, model, task, single, shards, args.out / name)

    if args.eval_only:
        model.load_state_dict(torch.load(args.out / f"{name}.pt", weights_only=True))
        metrics = score()
        return {"task": name, "eval_only": True, "torch": torch.__version__, "final": metrics}
    while state.step < args.steps:
        rng.shuffle(samples)
        for i in range(0, len(samples) - args.batch_size + 1, args.batch_size):
            scalars = train_step(state, task, [collate(samples[i : i + args.batch_size], name)])
            if state.step % 25 == 0:
                print(f"{name} step {state.step} loss {scalars['loss']:.3f} "
                      f"({time.perf_counter() - start:.0f} s)", flush=True)
            if state.step % args.eval_every == 0 or state.step == args.steps:
                torch.save(model.state_dict(), args.out / f"{name}.pt")
                if args.train_only:
                    continue
                eval_start = time.perf_counter()
                metrics = score()
                eval_s += time.perf_counter() - eval_start
                history.append({"step": state.step, "wall_s": round(time.perf_counter() - start, 1),
                                "train_s": round(time.perf_counter() - start - eval_s, 1),
                                **metrics})
                print(json.dumps(history[-1]), flush=True)
            if state.step >= args.steps:
                break
    return {
        "task": name, "steps": state.step, "wall_s": round(time.perf_counter() - start, 1),
        "threads": args.threads, "batch_size": args.batch_size, "image_size": args.image_size,
        "eval_image_size": args.eval_image_size, "num_queries": args.num_queries, "lr": args.lr, "num_points": args.num_points, "torch": torch.__version__,
        "final": history[-1] if history else None, "history": history,
    }


def _score(evaluate, model, task, loader, shards: Path, stem: Path) -> dict:
    """The evaluator's metrics at the eval size, plus the written prediction files re-scored
    against the dataset's full-resolution ground truth (``cf eval --predictions``'s scorers),
    which is exact whatever the eval size."""
    import torch

    from clusterformer.metrics.seg_common import predictions_path_for

    written = predictions_path_for(f"{stem}.json", task.spec.prediction_suffix)
    metrics = evaluate(model, task, loader, device=torch.device("cpu"), predictions_out=written)
    return {**metrics, "full_res": task.spec.score_file(written, shards, task=task.name)}


if __name__ == "__main__":
    main()
