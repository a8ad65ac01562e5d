"""Detection acceptance run: overfit nano on 16 synthetic-shapes images, then box AP on them.

    python benchmarks/overfit_detection.py --out /tmp/cf-overfit [--steps 300] [--threads 2]

Makes the images (``cf make-shapes``), shards them as COCO (``cf shard-dataset --format coco``),
then trains with the engine's own optimizer, schedule and ``train_step`` and scores with the
engine's ``evaluate`` (COCOeval) on the same 16 images. Overfitting means fitting these exact
images, so batches come from the loader's eval transform (no scale jitter or crop), reshuffled
every epoch. Prints steps, wall time and the metrics as JSON (also OUT/overfit.json).
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=96)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import torch

    from clusterformer.data import LoaderSpec, build_loader, make_shapes, open_source, write_shards
    from clusterformer.data.collate import collate
    from clusterformer.engine.evaluate import evaluate
    from clusterformer.engine.optim import Schedule, build_optimizer
    from clusterformer.engine.step import TrainState, train_step
    from clusterformer.tasks import build_task

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    raw, shards = args.out / "shapes", args.out / "shards"
    made = make_shapes(raw, num_images=16, image_size=128, seed=args.seed)
    info = write_shards(open_source("coco", made["images"], made["instances"]), shards,
                        samples_per_shard=16)
    categories = info["categories"]
    task = build_task("detection", categories)
    model = task.build_model("clusterformer-nano")
    state = TrainState(
        model=model, module=model,
        optimizer=build_optimizer(model, lr=args.lr, weight_decay=0.05),
        schedule=Schedule(args.steps, 20, "cosine", 0.01), device=torch.device("cpu"),
        grad_clip=1.0,
    )
    # The 16 transformed samples, kept once; every epoch batches them in a new order.
    single = build_loader(str(shards), "detection",
                          LoaderSpec(batch_size=1, image_size=args.image_size, train=False))
    samples = [batch_as_sample(b) for b in single]
    rng = random.Random(args.seed)
    history, start = [], time.perf_counter()
    while state.step < args.steps:
        rng.shuffle(samples)
        for i in range(0, len(samples) - args.batch_size + 1, args.batch_size):
            scalars = train_step(state, task, [collate(samples[i : i + args.batch_size], "detection")])
            if state.step % 25 == 0:
                print(f"step {state.step} loss {scalars['loss']:.3f} "
                      f"({time.perf_counter() - start:.0f} s)", flush=True)
            if state.step % args.eval_every == 0 or state.step == args.steps:
                metrics = evaluate(model, task, single, device=torch.device("cpu"))
                history.append({"step": state.step, "wall_s": round(time.perf_counter() - start, 1),
                                **metrics})
                print(json.dumps(history[-1]), flush=True)
            if state.step >= args.steps:
                break
    report = {
        "steps": state.step, "wall_s": round(time.perf_counter() - start, 1),
        "threads": args.threads, "batch_size": args.batch_size, "image_size": args.image_size,
        "lr": args.lr, "torch": torch.__version__, "final": history[-1], "history": history,
    }
    print(json.dumps(report, indent=2))
    (args.out / "overfit.json").write_text(json.dumps(report, indent=2) + "\n")


def batch_as_sample(batch: dict) -> dict:
    """A one-image eval batch back to the transformed sample ``collate`` expects."""
    target = batch["targets"][0]
    h, w = target["size"]
    return {**target, "image": batch["images"][0, :, :h, :w]}


if __name__ == "__main__":
    main()
