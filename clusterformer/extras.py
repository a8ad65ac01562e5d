"""Optional extras (``pip install 'clusterformer[NAME]'``): import one or say which to install.

Plots need matplotlib (``plot``); the training loggers need ``tensorboard``, ``mlflow`` or
``wandb``. Nothing else in the package imports them at module level, so a missing extra costs
nothing until a command asks for it, and then it is one line naming the extra.
"""

from __future__ import annotations

import importlib
from types import ModuleType


class MissingExtra(ValueError):
    """An optional package is not installed (a ValueError: the CLI prints its one line)."""

    exit_code = 1


def install_hint(extra: str) -> str:
    return f"install the {extra} extra: pip install 'clusterformer[{extra}]'"


def require(module: str, extra: str, needed_by: str) -> ModuleType:
    """``import module`` or raise :class:`MissingExtra` naming ``extra`` and who needs it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingExtra(f"{needed_by} needs {module.split('.')[0]}; "
                           f"{install_hint(extra)}") from None  # fmt: skip
