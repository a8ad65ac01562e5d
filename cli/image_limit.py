"""``--max-image-pixels``: the decoded-size limit, added in one place to every command that
decodes images (``cf train`` gets it on the real command that ``train_cmd.build_command``
makes: its stand-in passes its arguments through unparsed)."""

from __future__ import annotations

import os
from typing import Any

import typer

# The same numbers as clusterformer.data.images (DEFAULT_MAX_IMAGE_PIXELS,
# MAX_IMAGE_PIXELS_ENV; a test checks): importing it here would import torch on `cf --help`.
DEFAULT_MAX_IMAGE_PIXELS = 89_478_485
ENV = "CF_MAX_IMAGE_PIXELS"
DECODING_COMMANDS = ("eval", "predict", "shard-dataset", "quickstart")
HELP = (
    "Refuse to decode an image of more pixels (width x height) than this: a small file can "
    "decode to gigabytes. Where the command has --on-error, such an image is a bad sample. "
    "The default is Pillow's own limit."
)


def _apply(ctx: typer.Context, value: int | None) -> int | None:
    if value is None or ctx.resilient_parsing:
        return value
    from clusterformer.data import images

    limit, env = images.max_image_pixels(), os.environ.get(ENV)
    images.set_max_image_pixels(value)

    def restore() -> None:  # a command run in-process (tests) leaves the next one's limit be
        images.set_max_image_pixels(limit)
        if env is None:
            os.environ.pop(ENV, None)
        else:
            os.environ[ENV] = env

    ctx.call_on_close(restore)
    return value


def image_limit_option() -> Any:
    """The option, made by Typer itself: Typer parses with its own copy of Click, which a
    plain ``click.Option`` does not fit."""
    holder = typer.Typer()

    @holder.command()
    def _holder(
        max_image_pixels: int = typer.Option(
            DEFAULT_MAX_IMAGE_PIXELS, "--max-image-pixels", min=1, metavar="PIXELS", envvar=ENV,
            show_envvar=True, show_default=True, expose_value=False, callback=_apply,
            help=HELP),
    ) -> None:  # fmt: skip
        pass

    return typer.main.get_command(holder).params[0]


def with_image_limit(command: Any, names: tuple[str, ...] = DECODING_COMMANDS) -> Any:
    """Give ``command`` (a single command), or its subcommands called ``names`` (a group),
    the ``--max-image-pixels`` option; returns ``command``."""
    subcommands = getattr(command, "commands", None)
    targets = [command] if subcommands is None else [subcommands[n] for n in names
                                                     if n in subcommands]  # fmt: skip
    for target in targets:
        if not any(p.name == "max_image_pixels" for p in target.params):
            target.params.append(image_limit_option())
    return command
