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
from clusterformer.tasks.spec import Task, TaskSpec

_SPECS: dict[str, TaskSpec] = {}


def register_task(spec: TaskSpec) -> TaskSpec:
    """Register ``spec`` (replacing a task of the same name); returns it."""
    if not spec.name or not spec.name.replace("-", "_").isidentifier():
        raise ValueError(f"task name {spec.name!r} must be a word (letters, digits, - and _)")
    if spec.primary_metric not in spec.metric_keys:
        raise ValueError(f"{spec.name}: primary metric {spec.primary_metric!r} is not one of "
                         f"its metric keys {spec.metric_keys}")  # fmt: skip
    register_sample_spec(spec.name, spec.data)
    register_task_model(spec.name, spec.architecture)
    _SPECS[spec.name] = spec
    return spec


def task_names() -> list[str]:
    """Every registered task, built-in ones first."""
    load_task_modules()
    return list(_SPECS)


def task_spec(name: str) -> TaskSpec:
    """The spec of task ``name`` (ValueError naming the known tasks otherwise)."""
    if name not in _SPECS:
        load_task_modules()
    if name not in _SPECS:
        raise ValueError(f"unknown task {name!r}; choose one of {', '.join(_SPECS)}")
    return _SPECS[name]


def build_task(name: str, categories: list[dict] | int, **options: Any) -> Task:
    """Task ``name`` built for ``categories`` (a dataset's, or ``n`` placeholder classes) with
    ``options`` (the spec's options; unset ones take their defaults)."""
    return task_spec(name).build(categories, options)
