"""``--help`` shows a default for every option: Click shows none for an option whose default is
``None`` or for an on/off switch, so those get one spelled out (``unset``, ``off``) unless their
help text already says it."""

from __future__ import annotations

from typing import Any


def show_every_default(command: Any) -> Any:
    """Mark the options of ``command`` and its subcommands (recursively) so that ``--help``
    shows a default for each; returns ``command``."""
    for sub in getattr(command, "commands", {}).values():
        show_every_default(sub)
    for param in command.params:
        if getattr(param, "param_type_name", "") != "option" or param.name == "help":
            continue
        if param.required or "default" in (param.help or "").lower():
            continue  # the help states it: "default unset" beside it would contradict the text
        if param.default is None:
            param.show_default = "unset"
        elif getattr(param, "is_flag", False) and not param.secondary_opts:
            param.show_default = "on" if param.default else "off"
    return command
