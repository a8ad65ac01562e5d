"""The ``cf`` Typer application: global options, error handling and command registration.

Commands live one per module and register themselves through ``register(app)``. They import
torch and the library inside their bodies so that ``cf --help`` stays instant.
"""

from __future__ import annotations

import sys

import typer

from clusterformer.cli import (
    benchmark_cmd,
    errors,
    eval_cmd,
    export_cmd,
    models_cmd,
    plot_cmd,
    predict_cmd,
    progress,
    quickstart_cmd,
    runtime_opts,
    shapes_cmd,
    shard_cmd,
    train_cmd,
)
from clusterformer.cli.help_defaults import show_every_default
from clusterformer.cli.help_width import fit_help_to_width
from clusterformer.cli.image_limit import with_image_limit

app = typer.Typer(
    name="cf",
    help="ClusterFormer: one model family and one CLI for classification, detection, "
    "instance, semantic and panoptic segmentation.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)

for _module in (models_cmd, shapes_cmd, shard_cmd, train_cmd, eval_cmd, predict_cmd, export_cmd,
                plot_cmd, benchmark_cmd, quickstart_cmd):
    _module.register(app)


def _version(value: bool) -> None:
    if value:
        from clusterformer import __version__

        typer.echo(f"clusterformer {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
    debug: bool = typer.Option(
        False, "--debug", help="Show full tracebacks instead of one-line errors."
    ),
    threads: int | None = typer.Option(
        None, "--threads", min=1,
        help="CPU threads for torch (default: OMP_NUM_THREADS, else one per core). On a busy "
        "machine fewer threads are often faster.",
    ),
    no_progress: bool = typer.Option(
        False, "--no-progress",
        help="No live progress bars (they are drawn only when stderr is a terminal anyway; "
        "CF_NO_PROGRESS=1 does the same).",
    ),
) -> None:
    errors.DEBUG = debug
    runtime_opts.THREADS = threads
    progress.DISABLED = no_progress


def main(argv: list[str] | None = None) -> None:
    """Console entry point: runs the app, turning failures into one line on stderr."""
    args = sys.argv[1:] if argv is None else argv
    try:
        command = fit_help_to_width(with_image_limit(show_every_default(
            typer.main.get_command(app))))
        code = command.main(args=args, prog_name="cf", standalone_mode=False)
    except KeyboardInterrupt:
        print("cf: interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as exc:  # noqa: BLE001 - the CLI's last line of defence
        usage = errors.usage_line(exc)  # a bad or missing flag (Typer's own parsing)
        if usage is not None:
            print(usage, file=sys.stderr)
            sys.exit(2)
        if errors.DEBUG or "--debug" in args:
            raise
        print(f"cf: error: {errors.describe(exc)}", file=sys.stderr)
        sys.exit(errors.exit_code(exc))
    if code == 130:  # Typer turns Ctrl-C into a silent Exit(130); say it, as training does
        print("cf: interrupted", file=sys.stderr)
    sys.exit(code if isinstance(code, int) else 0)  # as Click's standalone mode does
