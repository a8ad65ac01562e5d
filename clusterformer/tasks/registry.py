"""The task registry: every task module registers its :class:`TaskSpec` here on import.

:func:`register_task` also hands the task's pieces to the layers that may not import the tasks:
its :class:`~clusterformer.data.sample_spec.SampleSpec` to the data code and its architecture to
the model registry. Names that are not registered yet make the registry import the task modules
(built-in and plugins, :mod:`clusterformer.plugins`) first.
"""

from __future__ import annotations

from typing import Any

from clusterformer.data.sample_spec import register_sample_spec
from clusterformer.models.registry import register_task_model
from clusterformer.plugins import load_task_modules
from clusterformer.registry import Registry
from clusterformer.tasks.spec import Task, TaskSpec

TASKS: Registry[TaskSpec] = Registry("task", load=load_task_modules)


def register_task(spec: TaskSpec, *, replace: bool = False) -> TaskSpec:
    """Register ``spec`` and return it.

    Raises:
        DuplicateNameError: a task of that name is registered and ``replace`` is false.
        ValueError: a name that is not a word, or a primary metric not among the metric keys.
    """
    if not spec.name or not spec.name.replace("-", "_").isidentifier():
        raise ValueError(f"task name {spec.name!r} must be a word (letters, digits, - and _)")
    if spec.primary_metric not in spec.metric_keys:
        raise ValueError(f"{spec.name}: primary metric {spec.primary_metric!r} is not one of "
                         f"its metric keys {spec.metric_keys}")  # fmt: skip
    TASKS.check_free(spec.name, replace=replace)  # before the other layers' registries change
    register_sample_spec(spec.name, spec.data, replace=replace)
    register_task_model(spec.name, spec.architecture, replace=replace)
    return TASKS.register(spec.name, spec, replace=replace)


def task_names() -> list[str]:
    """Every registered task, built-in ones first."""
    return TASKS.names()


def task_spec(name: str) -> TaskSpec:
    """The spec of task ``name`` (ValueError naming the known tasks otherwise)."""
    return TASKS.get(name)


def build_task(name: str, categories: list[dict] | int, **options: Any) -> Task:
    """Task ``name`` built for ``categories`` (a dataset's, or ``n`` placeholder classes) with
    ``options`` (the spec's options; unset ones take their defaults)."""
    return task_spec(name).build(categories, options)
