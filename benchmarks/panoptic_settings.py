"""Held-out PQ of one panoptic training setting on synthetic scenes (the quickstart's search).

    # scenes as cf quickstart makes them: 2048 training (seed 0), 128 held-out (seed 1000), 64 px
    python benchmarks/panoptic_settings.py data /tmp/pan --thing-scale 0.15 0.3 --no-occlusion \
        --contrast
    # one run: the shapes-panoptic recipe with overrides, from a classifier's backbone
    OMP_NUM_THREADS=1 python benchmarks/panoptic_settings.py train /tmp/pan --name cw2 \
        --steps 600 --pretrained RUN --set task.class_weight=2.0

``--set KEY=VALUE`` sets one setting of the ``shapes-panoptic`` recipe by its dotted key, as
``cf train --set`` does (values read as YAML: ``--set model.decoder.query_init=encoder --set
task.class_weight=2.0 --set optim.backbone_lr_mult=1.0`` is the recipe before the third
session). The run evaluates every ``--eval-every`` steps and prints the final held-out metrics
as one JSON line.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def make_data(root: Path, num_train: int, num_val: int, size: int,
              thing_scale: tuple[float, float], occlusion: bool, contrast: bool) -> None:  # fmt: skip
    from clusterformer.data import make_shapes, open_source, write_shards

    for split, count, seed in (("train", num_train, 0), ("val", num_val, 1000)):
        made = make_shapes(root / f"raw-{split}", num_images=count, image_size=size, seed=seed,
                           kinds=("scenes",), thing_scale=thing_scale, occlusion=occlusion,
                           contrast=contrast)  # fmt: skip
        source = open_source("coco-panoptic", made["images"], made["panoptic_json"],
                             made["panoptic_masks"])  # fmt: skip
        write_shards(source, root / f"shards-{split}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("mode", choices=["data", "train"])
    parser.add_argument("root", type=Path)
    parser.add_argument("--num-train", type=int, default=2048)
    parser.add_argument("--num-val", type=int, default=128)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--thing-scale", type=float, nargs=2, default=(0.08, 0.22))
    parser.add_argument("--no-occlusion", action="store_true")
    parser.add_argument("--contrast", action="store_true")
    parser.add_argument("--name", default="run")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--eval-every", type=int, default=300)
    parser.add_argument("--pretrained", default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--set", dest="pairs", action="append", default=[])
    args = parser.parse_args()
    if args.mode == "data":
        make_data(args.root, args.num_train, args.num_val, args.size, tuple(args.thing_scale),
                  not args.no_occlusion, args.contrast)  # fmt: skip
        return

    from clusterformer.engine.config_files import resolve_config
    from clusterformer.engine.loop import train

    cfg = resolve_config(
        "shapes-panoptic", data=str(args.root / "shards-train"),
        val_data=str(args.root / "shards-val"), out=str(args.root / f"run-{args.name}"),
        steps=args.steps, image_size=args.size, pretrained=args.pretrained, device=args.device,
        eval_every=args.eval_every, sets=args.pairs,
    )
    start = time.perf_counter()
    result = train(cfg, handle_signals=False)
    print(json.dumps({"name": args.name, "train_eval_s": round(time.perf_counter() - start, 1),
                      **{k: round(v, 2) for k, v in result.metrics.items()}}))  # fmt: skip


if __name__ == "__main__":
    main()
