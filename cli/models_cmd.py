"""``cf models``: the model presets with their size and cost, and every registered backbone."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    @app.command("models")
    def models(
        as_json: bool = typer.Option(
            False, "--json", help="Print a JSON list instead of a table (machine-readable): the presets first (kind "
            "'preset': params, depths, widths, GFLOPs), then the other backbone names (kind "
            "'family' or 'backbone': name and about only)."
        ),
        image_size: int = typer.Option(
            224, "--image-size", min=1, help="Square input side used to count GFLOPs."
        ),
    ) -> None:
        """List the model presets: parameters (1000-class head), depths, widths and GFLOPs;
        then the other --model names (registered backbones, e.g. timm/<name> and plugins').

        GFLOPs are counted by torch.utils.flop_counter on one image (matmul + conv only,
        2 FLOPs per multiply-add); models are built on the meta device, so nothing is
        allocated or downloaded.
        """
        import json

        from rich.console import Console

        from clusterformer.models import list_models
        from clusterformer.models.backbones import BACKBONES
        from clusterformer.models.summary import describe_model

        rows = [{**describe_model(name, image_size=image_size), "kind": "preset"}
                for name in list_models()]  # fmt: skip
        others = [{"name": name + "<name>" if name.endswith("/") else name,
                   "kind": "family" if name.endswith("/") else "backbone", "about": entry.about}
                  for name, entry in BACKBONES.items() if name not in list_models()]  # fmt: skip
        if as_json:
            typer.echo(json.dumps(rows + others, indent=2))
            return
        console = Console()
        console.print(_preset_table(rows, image_size))
        console.print(_backbone_table(others))


def _preset_table(rows: list[dict], image_size: int):  # noqa: ANN202 - a rich Table
    from rich.table import Table

    table = Table(
        title="ClusterFormer presets",
        caption="params with a 1000-class head; GFLOPs = matmul+conv FLOPs (2 per "
        "multiply-add) of one image",
    )
    table.add_column("name", style="bold", no_wrap=True)
    table.add_column("params (M)", justify="right", no_wrap=True)
    table.add_column("depths", no_wrap=True)
    table.add_column("dims", no_wrap=True)
    table.add_column(f"GFLOPs @{image_size} (matmul+conv)", justify="right")
    for row in rows:
        table.add_row(
            row["name"], f"{row['params_m']:.2f}", ",".join(map(str, row["depths"])),
            ",".join(map(str, row["dims"])), f"{row['gflops']:.2f}",
        )
    return table


def _backbone_table(rows: list[dict]):  # noqa: ANN202 - a rich Table
    from rich.markup import escape
    from rich.table import Table

    table = Table(title="Other backbones (--model NAME)",
                  caption="a plugin registers more: clusterformer.models.register_backbone")  # fmt: skip
    table.add_column("name", style="bold", no_wrap=True)
    table.add_column("about")
    for row in rows:
        table.add_row(escape(row["name"]), escape(row["about"]))
    return table
