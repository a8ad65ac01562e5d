"""``cf export``: a checkpoint to ONNX or a torch.export ``.pt2``, with a parity check."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from clusterformer.cli.errors import DataError, UserError

EXPORT_STAGES = 4  # loading, tracing, writing, parity check


def register(app: typer.Typer) -> None:
    app.command("export")(export_command)


def export_command(
    ckpt: Path = typer.Option(..., "--ckpt", help="A run folder or a .safetensors checkpoint."),
    fmt: str = typer.Option(..., "--format", help="onnx (torch.onnx, dynamo exporter; needs the 'export' extra) or pt2 (torch.export ExportedProgram)."),
    out: Path = typer.Option(..., "--out", help="Output file, ending in .onnx or .pt2 to match --format."),
    image_size: int | None = typer.Option(None, "--image-size", help="Static S x S input (batch stays dynamic). Default: dynamic height and width (32-4096)."),
    with_postprocess: bool = typer.Option(False, "--with-postprocess", help="Put post-processing in the graph: classification softmax ('probs'); detection sigmoid + top-100 over queries x classes ('scores', 'labels', 'boxes' xyxy in input pixels); semantic per-pixel argmax at the input size ('label_map', 'label_scores', 'label_margins'). Default: raw head outputs."),
    opset: int = typer.Option(18, "--opset", help="ONNX opset version (>= 17)."),
    tolerance: float = typer.Option(1e-4, "--tolerance", help="Parity tolerance: max|exported - eager| / max|eager| per output."),
) -> None:
    """Export a trained model to ONNX or a torch.export program (.pt2) for deployment.

    The graph takes `images` (B, 3, H, W) float32 normalised with the checkpoint's mean/std
    and returns named outputs (classification `logits`; detection `pred_logits`,
    `pred_boxes`; segmentation `pred_logits`, `pred_masks`). The checkpoint's task, classes,
    preset, normalisation and evaluation preprocessing record (resize rule, crop, mean/std:
    what cf predict applies) travel in the file's metadata. After writing, the file is run
    (onnxruntime / torch.export.load) on a random and a synthetic-scene input at the export
    size and at a second size, and compared with the eager model; beyond tolerance the
    command fails and keeps the file as <stem>.parity-failed<suffix>."""
    fmt = _check_flags(ckpt, fmt, tolerance)

    from rich.console import Console

    from clusterformer.cli.progress import progress_bar
    from clusterformer.cli.runtime_opts import start_compute
    from clusterformer.data.output_lock import hold_output
    from clusterformer.export import ParityError, export_checkpoint

    start_compute("cpu")
    console = Console()
    # The exporter names its stages (load, trace, write, parity): one bar step each.
    with hold_output(out, "cf export", is_file=True), \
            progress_bar("export", EXPORT_STAGES) as update:
        done = iter(range(EXPORT_STAGES))
        try:
            result = export_checkpoint(
                ckpt, fmt, out, image_size=image_size, with_postprocess=with_postprocess,
                opset=opset, tolerance=tolerance,
                stage=lambda text: update(completed=next(done, EXPORT_STAGES - 1),
                                          description=f"export: {text}"),
            )
            failure = None
        except ParityError as exc:
            failure = exc
    if failure is not None:
        _print_parity(console, failure.results, tolerance)
        raise DataError(str(failure)) from failure
    _print_parity(console, result.parity, tolerance)
    _print_written(console, result, image_size)


def _check_flags(ckpt: Path, fmt: str, tolerance: float) -> str:
    """Usage errors (exit 2) and a missing checkpoint, before anything is built; the format
    in lower case."""
    fmt = fmt.lower()
    if fmt not in ("onnx", "pt2"):
        raise UserError(f"--format must be onnx or pt2, got {fmt!r}")
    if tolerance <= 0:
        raise UserError(f"--tolerance must be positive, got {tolerance}")
    if not ckpt.exists():
        raise FileNotFoundError(f"{ckpt}: checkpoint not found")
    return fmt


def _print_written(console: Any, result: Any, image_size: int | None) -> None:
    """The file written (an ``ExportResult``), its input shape and outputs, and any exporter
    fallback."""
    shape = ("dynamic batch, height and width" if result.dynamic
             else f"{image_size}x{image_size}, dynamic batch")  # fmt: skip
    console.print(f"wrote {result.path} ({result.task}, {result.exporter}, {shape}; "
                  f"outputs: {', '.join(result.output_names)}) in {result.seconds:.1f}s")
    if result.fallback_reason:
        console.print(f"[yellow]note:[/yellow] used the TorchScript exporter because the "
                      f"{result.fallback_reason}")


def _print_parity(console: object, results: list, tolerance: float) -> None:
    from rich.table import Table

    table = Table(title=f"parity vs eager (tolerance {tolerance:g} relative)")
    for column in ("input", "size", "output", "max abs", "max rel", ""):
        table.add_column(column, justify="right" if column.startswith("max") else "left")
    for r in results:
        table.add_row(r.input, f"{r.size[0]}x{r.size[1]}", r.output, f"{r.max_abs:.2e}",
                      f"{r.max_rel:.2e}", "[green]ok[/green]" if r.ok else "[red]FAIL[/red]")
    console.print(table)  # type: ignore[attr-defined]
