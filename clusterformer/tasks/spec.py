"""What a task is: a :class:`TaskSpec` (everything task-specific, registered once per task) and
the :class:`Task` it builds for one dataset's categories (what the loops call).

The engine, the CLI, the data code and the exporter only ever ask a spec or a task: adding a
task is one module that calls :func:`clusterformer.tasks.register_task` with its spec.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import TYPE_CHECKING, Any, Protocol

from clusterformer.data.sample_spec import SampleSpec

if TYPE_CHECKING:
    from pathlib import Path

    import torch
    from torch import Tensor, nn

Batch = dict[str, Any]
Outputs = tuple["Tensor", ...]


def option(default: Any, help: str, flag: str | None = None) -> Any:  # noqa: A002
    """A field of a task's options dataclass: its default, one line of help and, when the CLI
    flag is not ``--<name>`` (``--mixup`` for ``mixup_alpha``), the flag."""
    return field(default=default, metadata={"help": help, **({"flag": flag} if flag else {})})


class Evaluator(Protocol):
    """Accumulates predictions batch by batch; ``compute`` reduces across ranks.

    Optional, read by ``cf eval --plots`` when present: ``confusion_matrix() -> ((C, C)
    counts, rows true and columns predicted; class names)`` and ``per_class_metrics() ->
    {"<metric>/<class>": percent}``.
    """

    def update(self, predictions: Any, batch: Batch) -> None: ...

    def compute(self) -> dict[str, float]:
        """Metrics over everything seen on every rank (percent where the metric is a rate)."""
        ...


@dataclass(frozen=True)
class ExportHeads:
    """How a task's model becomes a graph (``cf export``).

    Attributes:
        raw_keys: keys of the model's output dict picked as the raw outputs, in order; ``()``
            when the model returns one tensor.
        raw_names: output names of the raw graph.
        postprocess: ``(raw tensors, images) -> tensors`` computed in the graph with
            ``--with-postprocess``; ``None`` when it cannot live in a graph.
        post_names: output names of the post-processed graph.
    """

    raw_keys: tuple[str, ...]
    raw_names: tuple[str, ...]
    postprocess: Callable[[Outputs, Tensor], Outputs] | None = None
    post_names: tuple[str, ...] = ()

    def names(self, with_postprocess: bool) -> tuple[str, ...]:
        return self.post_names if with_postprocess else self.raw_names

    def raw(self, outputs: Any) -> Outputs:
        """The raw head tensors of a model output (auxiliary outputs dropped)."""
        return tuple(outputs[k] for k in self.raw_keys) if self.raw_keys else (outputs,)


@dataclass(frozen=True)
class TaskSpec:
    """Everything task-specific, in one object.

    Attributes:
        name: the task name (``--task``, checkpoints).
        summary: one line for ``--help``.
        primary_metric, metric_keys: what ``cf eval`` reports (the primary one first).
        data: the dataset formats and sample fields it reads, its transform kind.
        architecture: the model architecture it trains (``clusterformer.models.ARCHITECTURES``).
        options: a dataclass of the task's options (loss weights, inference thresholds, ...):
            ``task.*`` in a training config, ``task_config`` in a checkpoint.
        runtime: ``runtime(spec, categories, options) -> Task``.
        export: the graph's outputs (:class:`ExportHeads`).
        describe: ``describe(prediction, categories, score_threshold, max_objects)`` -> the
            JSON-able record ``cf predict`` writes and draws (``classes``, ``detections`` or
            ``segments``; see :mod:`clusterformer.tasks.predictions`).
        score_file: ``score_file(predictions_path, data, task=name, num_workers=...[,
            per_class=True]) -> metrics`` for ``cf eval --predictions`` (``data`` read as the
            task's samples); ``None`` when the task has no prediction file format.
        lower_is_better: metric keys where a smaller value is better (the others: larger);
            ``--best-metric`` reads the direction here.
        prediction_suffix: what ``cf eval --out NAME.json`` writes its predictions as
            (``NAME<suffix>``), re-scorable with ``score_file``; ``None`` writes nothing.
        categories: dataset categories -> the task's categories (default: the same).
        test_time: the test-time strategies the task implements (``"tta"``: flip / multi-scale
            views merged by its ``Task.view_scores`` ... ``finish_views``; ``"slide"``:
            sliding windows, its views being per-pixel class probabilities and
            ``Task.window_scores`` given); see :mod:`clusterformer.tasks.tta`.
    """

    name: str
    summary: str
    primary_metric: str
    metric_keys: tuple[str, ...]
    data: SampleSpec
    architecture: str
    options: type
    runtime: Callable[..., Task]
    export: ExportHeads
    describe: Callable[[Any, list[dict], float, int], dict[str, Any]]
    score_file: Callable[..., dict[str, Any]] | None = None
    prediction_suffix: str | None = None
    categories: Callable[[list[dict]], list[dict]] = lambda categories: categories
    lower_is_better: tuple[str, ...] = ()
    test_time: frozenset[str] = frozenset()

    def improves(self, key: str, value: float, best: float | None) -> bool:
        """Whether ``value`` of metric ``key`` beats ``best`` (``None``: nothing yet)."""
        if best is None:
            return True
        return value < best if key in self.lower_is_better else value > best

    def option_fields(self) -> dict[str, Any]:
        """The option dataclass's fields by name."""
        return {f.name: f for f in fields(self.options)}

    def make_options(self, values: Mapping[str, Any] | None = None) -> Any:
        """The options dataclass from ``values`` (unset ones take their defaults).

        Raises:
            ValueError: a key that is not an option of this task, or a value of the wrong type.
        """
        known = self.option_fields()
        values = dict(values or {})
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ValueError(f"{', '.join(unknown)}: not an option of the {self.name} task "
                             f"(its options: {', '.join(known) or 'none'})")  # fmt: skip
        for key, value in values.items():
            default = known[key].default
            if default is not MISSING and default is not None and value is not None:
                values[key] = coerce(value, type(default), f"task.{key}")
        return self.options(**values)

    def build(self, categories: list[dict] | int, options: Any = None) -> Task:
        """The task for a dataset with ``categories`` (or for ``n`` placeholder classes)."""
        if isinstance(categories, int):
            categories = [{"id": i, "name": str(i), "train_id": i} for i in range(categories)]
        if options is None or isinstance(options, Mapping):
            options = self.make_options(options)
        return self.runtime(self, list(categories), options)


def coerce(value: Any, kind: type, where: str) -> Any:
    """``value`` as a ``kind`` (bool, int, float or str): ints pass as floats, nothing else
    changes type; ValueError naming ``where`` otherwise."""
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, kind) and not (kind is int and isinstance(value, bool)):
        return value
    raise ValueError(f"{where}: expected {kind.__name__}, got {value!r}")


class Task:
    """A task built for one set of categories: what the training and evaluation loops call.

    Attributes:
        spec: its :class:`TaskSpec`. categories: the dataset's categories (train id = index).
        num_classes: ``len(categories)``. options: the spec's options dataclass.
    """

    def __init__(self, spec: TaskSpec, categories: list[dict], options: Any) -> None:
        self.spec, self.categories, self.options = spec, categories, options
        self.num_classes = len(categories)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def primary_metric(self) -> str:
        return self.spec.primary_metric

    def build_model(self, preset: str, **overrides: Any) -> nn.Module:
        """A fresh model of ``preset`` with this task's head for its classes."""
        from clusterformer.models import create_model

        return create_model(preset, task=self.name, num_classes=self.num_classes, **overrides)

    def forward(self, model: nn.Module, batch: Batch) -> Any:
        """Run the model on a batch (``images`` (B, 3, H, W), ``pixel_mask`` (B, H, W)).

        A mask with no padded pixel is dropped: the model then takes its unmasked fast paths
        (the same numbers, tested). The check runs here, outside a compiled model, so a
        compiled model sees ``None`` too instead of breaking its graph on the data."""
        mask = batch.get("pixel_mask")
        if mask is not None and bool(mask.all()):
            mask = None
        return model(batch["images"], pixel_mask=mask)

    def augment(self, batch: Batch, generator: torch.Generator | None = None) -> Batch:
        """Train-time batch-level augmentation (mixup, ...); identity by default. Returns a
        new dict, never modifies ``batch``."""
        return batch

    def loss(self, outputs: Any, batch: Batch) -> tuple[Tensor, dict[str, float]]:
        """The scalar training loss and a dict of scalars to log (floats)."""
        raise NotImplementedError

    def postprocess(self, outputs: Any, batch: Batch) -> Any:
        """Raw model outputs -> predictions in the form the evaluator accepts."""
        raise NotImplementedError

    # Test-time augmentation and sliding windows (clusterformer.tasks.tta), for the tasks
    # whose spec lists them in ``test_time``. A view is one pass's per-image result at the
    # original image size, in a form that can be mirrored back and combined with others.
    def view_scores(self, outputs: Any, batch: Batch) -> list[Any]:
        """One pass's per-image view (at each image's ``orig_size``)."""
        raise NotImplementedError(f"the {self.name} task has no test-time augmentation")

    def unflip_view(self, view: Any, orig_size: tuple[int, int] | None) -> Any:
        """The view of a left-right mirrored image, mirrored back."""
        raise NotImplementedError(f"the {self.name} task has no test-time augmentation")

    def combine_views(self, a: Any, b: Any) -> Any:
        """Two views (or combinations) of one image -> one combination."""
        raise NotImplementedError(f"the {self.name} task has no test-time augmentation")

    def finish_views(self, combined: list[Any], count: int) -> Any:
        """Per-image combinations of ``count`` views -> predictions as :meth:`postprocess`
        returns them."""
        raise NotImplementedError(f"the {self.name} task has no test-time augmentation")

    def window_scores(self, outputs: Any, batch: Batch) -> Tensor:
        """Sliding windows: ``(B, C, h, w)`` per-pixel class scores at the input size of a batch
        of unpadded windows (summed over windows, so scores, not argmaxes)."""
        raise NotImplementedError(f"the {self.name} task has no sliding-window inference")

    def evaluator(self, predictions_out: Path | str | None = None,
                  per_class: bool = False) -> Evaluator:  # fmt: skip
        """A fresh evaluator for one pass over a dataset of this task's categories; with
        ``predictions_out`` it also writes the predictions there (``spec.prediction_suffix``).
        With ``per_class`` its metrics also hold one key ``<metric>/<class name>`` per class
        and metric (:func:`clusterformer.metrics.per_class.split_per_class` groups them); a
        task without per-class metrics may leave the argument out of its signature."""
        raise NotImplementedError

    def config(self) -> dict[str, Any]:
        """JSON-able task options (the training config's ``task`` section, the checkpoint's
        ``task_config``)."""
        return asdict(self.options)
