"""What a loader reads and how, as one record: :class:`LoaderSpec`.

``build_loader(path, task, spec)`` and the dataset behind it take this record instead of a
long list of keyword arguments, so a caller states a loader once (the training loop builds
its training and validation loaders from one spec and :func:`dataclasses.replace`) and a new
setting is one field here, not a parameter threaded through three signatures.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from .preprocess import EvalPreprocess, as_record, default_eval_preprocess, eval_transform
from .sample_spec import SampleSpec
from .transforms import Transform, train_transform

ON_ERROR = ("stop", "skip")


@dataclass(frozen=True, kw_only=True)
class LoaderSpec:
    """How one rank reads a dataset (see :mod:`clusterformer.data.loader`).

    Attributes:
        batch_size: samples per batch (at least 1).
        image_size: the transform's size (``--image-size``); ``preprocess`` replaces it for
            evaluation.
        train: training (shuffled, augmented, equal full batches on every rank) or evaluation
            (every sample once, in order, padding batches marked ``valid == False``).
        num_workers: DataLoader worker processes (0: read in this process).
        seed: seeds shard order, shuffle buffer and augmentation with the epoch, rank and
            worker.
        rank, world_size: this process's place; ``None``: from ``torch.distributed`` when it is
            initialised, else rank 0 of 1 (:meth:`resolved`).
        shuffle_buffer: samples held by the training shuffle buffer.
        drop_last: leave out a last partial batch; ``None``: the same as ``train``.
        on_error: ``"stop"`` raises on the first bad sample naming its key and file, ``"skip"``
            warns and goes on (training refills from other samples; evaluation keeps its batch
            count with padding).
        augment: training augmentation options (:func:`.transforms.train_transform`).
        normalisation: the model's ``{"mean", "std"}`` (default ImageNet's); other keys are
            left out.
        preprocess: an evaluation record (:class:`~.preprocess.EvalPreprocess` or its dict
            form, e.g. a checkpoint's) that replaces ``image_size`` and ``normalisation`` for
            evaluation.
    """

    batch_size: int
    image_size: int
    train: bool
    num_workers: int = 0
    seed: int = 0
    rank: int | None = None
    world_size: int | None = None
    shuffle_buffer: int = 1000
    drop_last: bool | None = None
    on_error: str = "stop"
    augment: Mapping[str, Any] = field(default_factory=dict)
    normalisation: Mapping[str, Any] = field(default_factory=dict)
    preprocess: EvalPreprocess | None = None

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {self.batch_size}")
        if self.on_error not in ON_ERROR:
            raise ValueError(f"on_error must be 'stop' or 'skip', got {self.on_error!r}")
        # Copies, so a caller's later change to its dicts cannot change a built loader.
        norm = {k: tuple(v) for k, v in dict(self.normalisation or {}).items()
                if k in ("mean", "std")}  # fmt: skip
        object.__setattr__(self, "normalisation", norm)
        object.__setattr__(self, "augment", dict(self.augment or {}))
        if self.preprocess is not None:
            object.__setattr__(self, "preprocess", as_record(self.preprocess))

    def resolved(self) -> LoaderSpec:
        """This spec with ``rank``, ``world_size`` and ``drop_last`` filled in (ValueError when
        the rank is outside the world)."""
        rank, world_size = self.rank, self.world_size
        dist = torch.distributed
        live = dist.is_available() and dist.is_initialized()
        if rank is None:
            rank = dist.get_rank() if live else 0
        if world_size is None:
            world_size = dist.get_world_size() if live else 1
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        drop_last = self.train if self.drop_last is None else bool(self.drop_last)
        return replace(self, rank=rank, world_size=world_size, drop_last=drop_last)

    def transform(self, task: SampleSpec) -> Transform:
        """The sample transform of this spec: the training augmentation, or the evaluation
        record's (``preprocess``, else the task's default record at ``image_size``)."""
        if self.train:
            return train_transform(task, self.image_size, **self.normalisation, **self.augment)
        record = self.preprocess or default_eval_preprocess(task.transform, self.image_size,
                                                            **self.normalisation)  # fmt: skip
        return eval_transform(record)
