"""``cf make-shapes``: write the synthetic shapes dataset in four real formats."""

from __future__ import annotations

from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    @app.command("make-shapes")
    def make_shapes_cmd(
        out: Path = typer.Argument(..., help="Folder to write (created if missing)."),
        num_images: int = typer.Option(64, "--num-images", min=1, help="Number of scenes (and of classification images)."),
        image_size: int = typer.Option(128, "--image-size", min=32, help="Side of the square images in pixels."),
        seed: int = typer.Option(0, "--seed", help="Random seed; the same seed gives byte-identical files."),
        only: str | None = typer.Option(
            None, "--only", help="Write only 'scenes' (COCO, panoptic, semantic) or only "
            "'classes' (the ImageFolder tree of single-shape pictures, much faster); default both."),
        thing_scale: tuple[float, float] = typer.Option(
            (0.08, 0.22), "--thing-scale", help="Radius range of the scenes' things as a "
            "fraction of --image-size (MIN MAX; larger things are easier for small models)."),
        occlusion: bool = typer.Option(
            True, "--occlusion/--no-occlusion", help="Let things cover each other (default), or "
            "keep them apart so each shows its whole outline."),
        contrast: bool = typer.Option(
            False, "--contrast/--any-colour", help="Paint each thing in a colour that stands "
            "out from what it covers (as the classification images are); default: any colour, "
            "so some things nearly vanish into the background."),
    ) -> None:
        """Synthetic shapes (circle, rectangle, triangle, ellipse over sky/ground/water).

        Writes OUT/images/*.jpg, OUT/instances.json (COCO), OUT/panoptic.json +
        OUT/panoptic/*.png (COCO panoptic), OUT/semantic/*.png + OUT/classes.json (ADE20K
        style) and OUT/classes/<class>/*.jpg (ImageFolder).
        """
        from rich.console import Console

        from clusterformer.cli.errors import UserError
        from clusterformer.data.shapes import KINDS, make_shapes

        if only is not None and only not in KINDS:
            raise UserError(f"--only must be one of {', '.join(KINDS)}, got '{only}'")
        kinds = KINDS if only is None else (only,)
        console = Console(stderr=True, soft_wrap=True)
        with console.status(f"writing {num_images} synthetic images to {out}"):
            result = make_shapes(
                out, num_images=num_images, image_size=image_size, seed=seed, kinds=kinds,
                thing_scale=thing_scale, occlusion=occlusion, contrast=contrast,
            )
        if only == "classes":
            console.print(f"wrote {num_images} classification images to {out}/classes")
            console.print(f"  shard with: cf shard-dataset --format imagefolder --images "
                          f"{out}/classes --out DIR")
            return
        also = "" if only else f" and {num_images} classification images"
        console.print(
            f"wrote {result['num_images']} scenes ({result['num_annotations']} instances, "
            f"{result['num_segments']} panoptic segments){also} to {out}"
        )
        console.print(
            f"  shard with: cf shard-dataset --format coco --images {out}/images "
            f"--annotations {out}/instances.json --out DIR"
        )
