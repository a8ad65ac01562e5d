"""``--help`` that reads in a narrow terminal: below :data:`RICH_MIN_COLUMNS` columns the
commands use Click's plain help layout instead of rich's panels.

Rich lays the options out as a table whose flag and type columns take their full width
first; at 80 columns the help column is left a dozen characters, and rich cuts a long flag
(``--samples-per-sh…``) or any word longer than that (``CF_MAX_IMAGE_PIX…``) with an
ellipsis. Click's layout puts a long flag on its own line and wraps the help under it,
cutting nothing, at any width.
"""

from __future__ import annotations

import shutil
from typing import Any

# Every command's rich help fits without a cut word from here up (checked at 100 columns).
RICH_MIN_COLUMNS = 100


def terminal_columns() -> int:
    """The width help is laid out for: ``COLUMNS`` when set, else the terminal's."""
    return shutil.get_terminal_size().columns


def fit_help_to_width(command: Any) -> Any:
    """Make ``command`` and its subcommands (recursively) print plain help below
    :data:`RICH_MIN_COLUMNS` columns; returns ``command``."""
    if terminal_columns() >= RICH_MIN_COLUMNS:
        return command
    for sub in getattr(command, "commands", {}).values():
        fit_help_to_width(sub)
    if hasattr(command, "rich_markup_mode"):
        command.rich_markup_mode = None
    return command
