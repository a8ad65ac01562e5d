"""``cf train``'s flags as Typer parameters (the flags themselves come from the training config:
:mod:`clusterformer.engine.config_flags`)."""

from __future__ import annotations

import inspect

import typer

from clusterformer.engine.config_flags import Flag, help_text


def typer_parameters(flags: list[Flag]) -> list[inspect.Parameter]:
    """The flags as keyword parameters with ``typer.Option`` defaults (all ``None``: not given)."""
    params = []
    for flag in flags:
        names = (f"{flag.flag}/--no-{flag.flag[2:]}",) if flag.kind is bool else (flag.flag,)
        option = typer.Option(None, *names, help=help_text(flag), show_default=False)
        params.append(inspect.Parameter(flag.ident, inspect.Parameter.KEYWORD_ONLY,
                                        default=option, annotation=flag.kind | None))  # fmt: skip
    return params
