"""Where task modules come from: the built-in ones and the user's plugins.

A task is one module that registers itself on import (``clusterformer.tasks.register_task``):
its spec with the task registry, its sample spec with the data code, its model architecture
with the model registry. The lower layers never import a task module by name; when asked for
a task they do not know yet they call :func:`load_task_modules`, which imports

* the built-in task modules (:data:`BUILTIN_TASK_MODULES`, the one list of them),
* the modules of the ``clusterformer.tasks`` entry-point group of installed packages
  (``[project.entry-points."clusterformer.tasks"] mytask = "mypackage.mytask"``),
* the modules named in the ``CLUSTERFORMER_PLUGINS`` environment variable (comma-separated
  import paths, e.g. ``CLUSTERFORMER_PLUGINS=mytask cf train --task mytask ...``).

A plugin module may register backbones (``clusterformer.models.register_backbone``) and
architectures as well as tasks: every registry (:class:`clusterformer.registry.Registry`) calls
:func:`load_task_modules` for a name it does not know yet.

This module imports nothing of the project, so any layer may use it.
"""

from __future__ import annotations

import importlib
import os
import sys

BUILTIN_TASK_MODULES: tuple[str, ...] = (
    "clusterformer.tasks.classification",
    "clusterformer.tasks.detection",
    "clusterformer.tasks.instance",
    "clusterformer.tasks.semantic",
    "clusterformer.tasks.panoptic",
)
# The task ``create_model`` builds for when none is named (its documented default).
DEFAULT_TASK = "classification"
ENTRY_POINT_GROUP = "clusterformer.tasks"
PLUGINS_ENV = "CLUSTERFORMER_PLUGINS"


class PluginError(ValueError):
    """A plugin module named by the user could not be imported; the message names it."""


def plugin_modules() -> list[str]:
    """Import paths of the user's task modules: entry points, then ``CLUSTERFORMER_PLUGINS``."""
    from importlib.metadata import entry_points

    found = [ep.module for ep in entry_points(group=ENTRY_POINT_GROUP)]
    found += [name.strip() for name in os.environ.get(PLUGINS_ENV, "").split(",") if name.strip()]
    return list(dict.fromkeys(found))


def load_task_modules() -> None:
    """Import every built-in and plugin task module that is not imported yet (each registers
    its task). A plugin that fails to import raises :class:`PluginError` naming it."""
    for name in BUILTIN_TASK_MODULES:
        if name not in sys.modules:
            importlib.import_module(name)
    for name in plugin_modules():
        if name in sys.modules:
            continue
        try:
            importlib.import_module(name)
        except Exception as exc:  # noqa: BLE001 - any failure of user code: name the module
            reason = " ".join(str(exc).split())[:200] or type(exc).__name__
            raise PluginError(f"task plugin {name!r} (from {PLUGINS_ENV} or the "
                              f"'{ENTRY_POINT_GROUP}' entry points) failed to import: "
                              f"{reason}") from exc  # fmt: skip
