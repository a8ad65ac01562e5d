"""``cf quickstart``: synthetic data -> shards -> train nano classification on CPU -> evaluate."""

from __future__ import annotations

import json
import time
from pathlib import Path

import typer

from clusterformer.cli.errors import UserError


def register(app: typer.Typer) -> None:
    @app.command("quickstart")
    def quickstart_command(
        out: Path = typer.Option(
            Path("cf-quickstart"),
            "--out",
            help="Folder for the data, shards and the run (created).",
        ),
        num_train: int = typer.Option(
            3072, "--num-train", min=8, help="Synthetic training images (64 px)."
        ),
        num_val: int = typer.Option(
            256, "--num-val", min=4, help="Held-out synthetic images (a different seed)."
        ),
        steps: int | None = typer.Option(
            None, "--steps", help="Training steps (default: the shapes recipe's)."
        ),
        image_size: int | None = typer.Option(
            None, "--image-size", help="Training size (default: the shapes recipe's)."
        ),
        seed: int = typer.Option(0, "--seed", help="Seed for data and training."),
        device: str | None = typer.Option(
            "cpu", "--device", help="Device to train on (default cpu)."
        ),
    ) -> None:
        """Synthetic shapes -> shards -> train nano classification on CPU -> held-out top-1 (minutes).

        Writes OUT/shapes-{train,val} (raw), OUT/shards-{train,val} (WebDataset), OUT/run
        (config.json, metrics.jsonl, checkpoints/last.safetensors) and OUT/predictions (a few
        held-out images with the predicted classes drawn on, plus JSON).
        """
        from rich.console import Console

        from clusterformer.data.formats import open_source
        from clusterformer.data.shapes import make_shapes
        from clusterformer.data.shards import write_shards
        from clusterformer.engine.config import resolve_config
        from clusterformer.engine.loop import TrainingInterrupted, train

        console = Console()
        run_dir = out / "run"
        if (run_dir / "checkpoints" / "last.safetensors").exists():
            raise UserError(
                f"{run_dir} already holds a trained model; remove it or choose another --out"
            )
        t0 = time.perf_counter()
        shards = {}
        for split, count, split_seed in (("train", num_train, seed), ("val", num_val, seed + 1000)):
            raw, shard_dir = out / f"shapes-{split}", out / f"shards-{split}"
            with console.status(f"[1/3] making {count} {split} images in {raw}"):
                made = make_shapes(raw, num_images=count, image_size=64, seed=split_seed)
                source = open_source("imagefolder", Path(made["classification"]))
                write_shards(
                    source, shard_dir, samples_per_shard=256, shuffle=True, seed=split_seed
                )
            shards[split] = shard_dir
        console.print(
            f"[1/3] data ready in {time.perf_counter() - t0:.0f} s: {shards['train']}, {shards['val']}"
        )
        cfg = resolve_config(
            "shapes",
            task="classification",
            data=str(shards["train"]),
            val_data=str(shards["val"]),
            out=str(run_dir),
            steps=steps,
            image_size=image_size,
            seed=seed,
            device=device,
        )
        console.print(f"[2/3] training {cfg.model} for {cfg.steps} steps at {cfg.image_size} px")
        t1 = time.perf_counter()
        try:
            result = train(cfg)
        except TrainingInterrupted as exc:
            console.print(f"interrupted: {exc}")
            raise typer.Exit(exc.exit_code) from None
        train_s = time.perf_counter() - t1
        metrics = result.metrics
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        console.print(
            f"[3/3] held-out ({metrics.get('num_samples')} images): top-1 {metrics.get('top1', 0):.2f} %, "
            f"top-5 {metrics.get('top5', 0):.2f} % (4 classes: top-5 = top-4)"
        )
        from clusterformer.cli.predict_cmd import predict_images

        # Pictures of what the model sees: a few held-out images with its top classes drawn on.
        classes = sorted(p for p in Path(made["classification"]).iterdir() if p.is_dir())
        examples = [image for folder in classes for image in sorted(folder.glob("*.jpg"))[:2]]
        predict_images(result.checkpoint, examples, out / "predictions", device=device)
        console.print(f"[3/3] predictions drawn on {len(examples)} held-out images: {out / 'predictions'}")
        console.print(f"done in {time.perf_counter() - t0:.0f} s (training {train_s:.0f} s)")
        console.print(f"  checkpoint: {result.checkpoint}")
        console.print(f"  evaluate again: cf eval --ckpt {run_dir} --data {shards['val']}")
        console.print(
            f"  continue training: cf train --task classification --data {shards['train']} "
            f"--out {run_dir} --recipe shapes --steps N --resume"
        )
