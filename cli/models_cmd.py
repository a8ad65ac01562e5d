"""``cf models``: the registered presets with their size and cost."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    @app.command("models")
    def models(
        as_json: bool = typer.Option(
            False, "--json", help="Print a JSON list instead of a table (machine-readable)."
        ),
        image_size: int = typer.Option(
            224, "--image-size", min=1, help="Square input side used to count GFLOPs."
        ),
    ) -> None:
        """List the model presets: parameters (1000-class head), depths, widths and GFLOPs.

        GFLOPs are counted by torch.utils.flop_counter on one image (matmul + conv only,
        2 FLOPs per multiply-add); models are built on the meta device, so nothing is
        allocated or downloaded.
        """
        import json

        from rich.console import Console
        from rich.table import Table

        from clusterformer.models import list_models
        from clusterformer.models.summary import describe_model

        rows = [describe_model(name, image_size=image_size) for name in list_models()]
        if as_json:
            typer.echo(json.dumps(rows, indent=2))
            return
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
        Console().print(table)
