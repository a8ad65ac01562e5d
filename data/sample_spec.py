"""What a task reads from a dataset, and where the data code looks it up by task name.

A task module (``clusterformer.tasks``) registers a :class:`SampleSpec` under its name; the
loader, transforms, collation and the metrics' ground-truth readers ask :func:`sample_spec`.
Data never imports the tasks: a name it does not know yet makes the registry
(:class:`clusterformer.registry.Registry`) load the task modules
(:func:`clusterformer.plugins.load_task_modules`), which register themselves.
"""

from __future__ import annotations

from dataclasses import dataclass

from clusterformer.plugins import load_task_modules
from clusterformer.registry import Registry

TRANSFORM_KINDS: tuple[str, ...] = ("image", "dense")


@dataclass(frozen=True)
class SampleSpec:
    """A task's view of a dataset.

    Attributes:
        formats: dataset formats it accepts (``dataset.json``'s ``format``); for a raw folder
            holding several, the first one found in this order is read.
        fields: decoded sample fields it needs besides ``image``, ``key``, ``image_id`` and
            ``orig_size`` (e.g. ``("boxes", "labels", "iscrowd")``).
        transform: ``"image"`` (random-resized crop / resize + centre crop, one label per
            image) or ``"dense"`` (scale jitter + crop / long-side resize; targets follow).
        label_field: a per-image integer field collated into ``batch["labels"]`` ``(B,)``;
            ``None`` puts the fields into ``batch["targets"]`` (one dict per image).
    """

    formats: tuple[str, ...]
    fields: tuple[str, ...]
    transform: str = "dense"
    label_field: str | None = None

    def __post_init__(self) -> None:
        if self.transform not in TRANSFORM_KINDS:
            raise ValueError(f"unknown transform kind {self.transform!r}; expected one of "
                             f"{', '.join(TRANSFORM_KINDS)}")  # fmt: skip


SAMPLE_SPECS: Registry[SampleSpec] = Registry("task", load=load_task_modules)


def register_sample_spec(task: str, spec: SampleSpec, *, replace: bool = False) -> None:
    """Make ``sample_spec(task)`` return ``spec`` (a task module calls this on import).

    Raises:
        DuplicateNameError: ``task`` has a spec already and ``replace`` is false.
    """
    SAMPLE_SPECS.register(task, spec, replace=replace)


def sample_spec(task: str | SampleSpec) -> SampleSpec:
    """The :class:`SampleSpec` of ``task`` (a name, or a spec passed through).

    Raises:
        ValueError: no task of that name is registered.
    """
    if isinstance(task, SampleSpec):
        return task
    return SAMPLE_SPECS.get(task)
