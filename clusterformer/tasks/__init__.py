"""Tasks: one module per task registers a :class:`TaskSpec` with everything task-specific
(data, model architecture and options, criterion, post-processing, evaluator and metric keys,
export heads, prediction records). The loops, the CLI, the data code and the exporter ask the
registry; a new task is a new module (or a plugin, see :mod:`clusterformer.plugins`)."""

from clusterformer.tasks.registry import build_task, register_task, task_names, task_spec
from clusterformer.tasks.spec import Evaluator, ExportHeads, Task, TaskSpec, option

__all__ = [
    "Evaluator",
    "ExportHeads",
    "Task",
    "TaskSpec",
    "build_task",
    "option",
    "register_task",
    "task_names",
    "task_spec",
]
