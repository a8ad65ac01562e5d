"""``cf shard-dataset``: raw COCO / COCO panoptic / ADE20K / ImageFolder data -> WebDataset shards."""

from __future__ import annotations

from enum import Enum
from pathlib import Path

import typer

from clusterformer.cli.options import OnError


class Format(str, Enum):
    coco = "coco"
    coco_panoptic = "coco-panoptic"
    ade20k = "ade20k"
    imagefolder = "imagefolder"


def register(app: typer.Typer) -> None:
    @app.command("shard-dataset")
    def shard_dataset_cmd(
        format: Format = typer.Option(..., "--format", help="Layout of the raw data."),
        images: Path = typer.Option(..., "--images", help="Image folder (ImageFolder: the folder of class folders)."),
        out: Path = typer.Option(..., "--out", help="Output folder for shard-*.tar and dataset.json (stale output there is replaced)."),
        annotations: Path | None = typer.Option(None, "--annotations", help="COCO instances / panoptic JSON; for ade20k an optional classes.json."),
        masks: Path | None = typer.Option(None, "--masks", help="Panoptic PNG folder (coco-panoptic) or label PNG folder (ade20k)."),
        samples_per_shard: int = typer.Option(1000, "--samples-per-shard", min=1, help="Samples per tar shard at most."),
        max_shard_mb: float = typer.Option(1024.0, "--max-shard-mb", min=0.001, help="Start a new shard before one grows past this size (MiB)."),
        shuffle: bool = typer.Option(True, "--shuffle/--no-shuffle", help="Shuffle sample order across shards (deterministic per --seed)."),
        seed: int = typer.Option(0, "--seed", help="Seed for --shuffle and --val-fraction's split."),
        val_fraction: float | None = typer.Option(None, "--val-fraction", help="Hold out this fraction (0-1) of the samples: writes OUT/train and OUT/val, split by --seed, the split recorded in each dataset.json. Default: no split."),
        on_error: OnError = typer.Option(OnError.stop, "--on-error", help="On a bad sample: stop with an error, or skip it (counted in dataset.json, listed in skipped.jsonl)."),
    ) -> None:
        """Write WebDataset shards (original image bytes + per-sample annotations) and dataset.json.

        Examples:
          cf shard-dataset --format coco --images DIR --annotations instances.json --out SHARDS
          cf shard-dataset --format coco-panoptic --images DIR --annotations panoptic.json --masks PNGS --out SHARDS
          cf shard-dataset --format ade20k --images DIR --masks LABELS --out SHARDS
          cf shard-dataset --format imagefolder --images DIR --out SHARDS
          cf shard-dataset --format imagefolder --images DIR --out SHARDS --val-fraction 0.2 --seed 0
        """
        from rich.console import Console

        from clusterformer.cli.errors import UserError
        from clusterformer.cli.progress import progress_bar
        from clusterformer.data.formats import check_arguments, open_source
        from clusterformer.data.shards import write_shards

        try:
            check_arguments(format.value, annotations, masks)
        except ValueError as exc:  # a flag missing or out of place: a usage error
            raise UserError(str(exc)) from None
        if val_fraction is not None and not 0.0 < val_fraction < 1.0:
            raise UserError(f"--val-fraction must be between 0 and 1 (exclusive), got {val_fraction}")
        console = Console(stderr=True, soft_wrap=True)
        source = open_source(format.value, images, annotations=annotations, masks=masks)
        with progress_bar("sharding", len(source)) as update:
            options = {"samples_per_shard": samples_per_shard, "max_shard_mb": max_shard_mb,
                       "shuffle": shuffle, "on_error": on_error.value,
                       "progress": lambda n: update(completed=n)}  # fmt: skip
            if val_fraction is None:
                written = {"": write_shards(source, out, seed=seed, **options)}
            else:
                from clusterformer.data.split import write_split_shards

                written = write_split_shards(source, out, val_fraction=val_fraction, seed=seed,
                                             origin=str(images), **options)  # fmt: skip
        for name, info in written.items():
            folder = out / name if name else out
            skipped = (f", {info['skipped']} skipped (see {folder / 'skipped.jsonl'})"
                       if info["skipped"] else "")  # fmt: skip
            console.print(f"wrote {info['num_samples']} samples in {len(info['shards'])} shards "
                          f"to {folder}{skipped}")
