"""Streaming loader: shards (or a raw dataset folder) -> decode -> transform -> padded batches.

Which samples each (rank, worker) reads, and how many batches each rank gives, is planned by
:mod:`clusterformer.data.epoch_plan`. Randomness (shard order, shuffle buffer, transforms) is
seeded from (seed, epoch, rank, worker) only, never from global state, so the same arguments
give the same batches.
"""

from __future__ import annotations

import os
import random
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .collate import collate
from .epoch_plan import WorkerPlan, batches_per_rank, plan_epoch
from .errors import DatasetError, ImageDecodeError, SampleError
from .loader_spec import LoaderSpec
from .sample_spec import SampleSpec, sample_spec
from .streams import (
    RawSource,
    open_raw,
    read_index,
    read_info_next_to,
    shard_source,
    url_list,
)

__all__ = ["Loader", "LoaderSpec", "build_loader", "load_dataset_info"]  # fmt: skip


def _seed(*parts: object) -> int:
    return random.Random("-".join(str(p) for p in parts)).getrandbits(63)


def _shuffled(stream: Iterator, size: int, rng: random.Random) -> Iterator:
    """Shuffle buffer: hold ``size`` items, emit a random one as each new item arrives."""
    buffer: list = []
    for item in stream:
        if len(buffer) < size:
            buffer.append(item)
            continue
        i = rng.randrange(size)
        buffer[i], item = item, buffer[i]
        yield item
    rng.shuffle(buffer)
    yield from buffer


class StreamDataset(IterableDataset):
    """Yields this rank's collated batches for the current epoch (see the module docstring).

    ``spec`` must be :meth:`LoaderSpec.resolved` (rank, world size and drop_last known)."""

    def __init__(self, source: Any, task: SampleSpec, spec: LoaderSpec) -> None:
        if spec.rank is None or spec.world_size is None or spec.drop_last is None:
            raise ValueError("StreamDataset needs a resolved LoaderSpec (spec.resolved())")
        self.source, self.task, self.spec = source, task, spec
        self.batch_size, self.train, self.seed = spec.batch_size, spec.train, spec.seed
        self.num_workers = max(1, spec.num_workers)
        self.rank, self.world_size = spec.rank, spec.world_size
        self.shuffle_buffer = spec.shuffle_buffer
        self.drop_last, self.on_error, self.epoch = spec.drop_last, spec.on_error, 0
        self.transform = spec.transform(task)
        self.fields = set(task.fields) | {"key", "image", "image_id", "orig_size"}

    def plans(self) -> list[WorkerPlan]:
        return plan_epoch(self.source.counts, rank=self.rank, world_size=self.world_size,
                          num_workers=self.num_workers, batch_size=self.batch_size,
                          train=self.train, drop_last=self.drop_last, seed=self.seed,
                          epoch=self.epoch)  # fmt: skip

    def __len__(self) -> int:
        plan = self.plans()
        return sum(p.num_batches + p.pad_batches for p in plan)

    def _one_pass(self, plan: WorkerPlan, units: list[tuple[int, int]]) -> Iterator[dict]:
        for unit, start in units:
            keep = lambda pos, start=start: plan.keeps(start + pos)  # noqa: E731
            try:
                for _, members in self.source.read(unit, keep):
                    yield members
            except DatasetError as exc:  # a damaged shard, or one the index miscounts
                if self.on_error == "stop":
                    raise
                warnings.warn(f"skipped the rest of a shard: {exc}", stacklevel=2)

    def _members(self, plan: WorkerPlan, rng: random.Random) -> Iterator[dict]:
        """The worker's samples, one pass at a time, each pass through the shuffle buffer
        (training): a pass ends before the next begins, so the first ``num_samples`` are
        each sample once. Training wraps around (a new unit order) only when batches remain
        to fill, i.e. after samples were skipped."""
        units = list(zip(plan.units, plan.starts, strict=True))
        # Capped at the worker's share: a larger buffer would only hold the whole pass anyway.
        buffer = min(self.shuffle_buffer, plan.num_samples)
        while True:
            members = self._one_pass(plan, units)
            if self.train and buffer > 1:
                members = _shuffled(members, buffer, rng)
            read = 0
            for m in members:
                read += 1
                yield m
            if not self.train or plan.num_samples == 0 or read == 0:
                return  # read == 0: every unit failed; wrapping around would spin forever
            rng.shuffle(units)  # wrap around, in a new order

    def _samples(self, members: Iterator[dict], gen: torch.Generator) -> Iterator[dict]:
        bad_in_a_row = 0
        for m in members:
            try:
                sample = self.source.decode(m)
                sample = {k: v for k, v in sample.items() if k in self.fields}
                try:
                    out = self.transform(sample, gen)
                except ImageDecodeError as exc:  # e.g. a resize past the pixel limit
                    raise ValueError(exc.reason) from None
            except (SampleError, ValueError, OSError) as exc:
                err = (
                    exc
                    if isinstance(exc, SampleError)
                    else SampleError(
                        m.get("__url__", "?"), m.get("__key__", "?"), " ".join(str(exc).split())
                    )
                )
                if self.on_error == "stop":
                    raise err from None
                warnings.warn(f"skipped bad sample: {err}", stacklevel=2)
                bad_in_a_row += 1
                if bad_in_a_row > 1000:
                    raise RuntimeError(
                        f"{self.source.where(0)}: over 1000 bad samples in a row"
                    ) from None
                continue
            bad_in_a_row = 0
            yield out

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        if info is not None and info.num_workers != self.num_workers:
            raise RuntimeError(
                f"loader planned for {self.num_workers} workers, got {info.num_workers}"
            )
        plan = self.plans()[worker]
        rng = random.Random(_seed("shuffle", self.seed, self.epoch, self.rank, worker))
        gen = torch.Generator().manual_seed(_seed("aug", self.seed, self.epoch, self.rank, worker))
        samples = self._samples(self._members(plan, rng), gen)
        done, first = 0, None
        for _ in range(plan.num_batches):
            chunk = [s for _, s in zip(range(self.batch_size), samples, strict=False)]
            if not chunk or (self.drop_last and len(chunk) < self.batch_size):
                if self.train:
                    raise RuntimeError(
                        f"{self.source.where(0)}: no decodable sample to fill a batch"
                    )
                break  # evaluation after skipped bad samples: padding below keeps the count
            first = first if first is not None else chunk[0]
            done += 1
            yield collate(chunk, self.task)
        if not self.train and not self.drop_last and next(samples, None) is not None:
            raise ValueError(
                f"{self.source.where(plan.units[0])}: holds more samples than "
                "dataset.json lists; the index is stale, rewrite the shards"
            )
        for _ in range(plan.num_batches + plan.pad_batches - done):
            if first is None:
                first = next(self._samples(self._any_members(), gen))
            yield collate([first], self.task, valid=[False])

    def _any_members(self) -> Iterator[dict]:
        for unit in range(len(self.source.counts)):
            for _, members in self.source.read(unit, lambda pos: True):
                yield members


# --------------------------------------------------------------------------- public API
class Loader:
    """Iterable of batch dicts with a rank-independent ``len`` and ``set_epoch``."""

    def __init__(self, dataset: StreamDataset, num_workers: int, info: dict) -> None:
        self.dataset, self.info, self.num_workers = dataset, info, num_workers
        self.batch_size = dataset.batch_size

    def __len__(self) -> int:
        return len(self.dataset)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose shuffle/augmentation the next ``iter`` uses."""
        self.dataset.epoch = int(epoch)

    def __iter__(self) -> Iterator[dict]:
        # Built per epoch: workers are not persistent and must see the current epoch.
        loader = DataLoader(self.dataset, batch_size=None, num_workers=self.num_workers,
                            persistent_workers=False, worker_init_fn=_worker_init,
                            collate_fn=_as_is,
                            # Own generator: iterating must not advance the global torch RNG.
                            generator=torch.Generator().manual_seed(self.dataset.seed),
                            prefetch_factor=4 if self.num_workers else None)  # fmt: skip
        return _worker_errors(iter(loader)) if self.num_workers else iter(loader)


def _worker_errors(batches: Iterator[dict]) -> Iterator[dict]:
    """``batches``, with an error raised in a worker process given back as the one line it
    said (DataLoader re-raises it as a RuntimeError holding the worker's whole traceback)."""
    try:
        yield from batches
    except RuntimeError as exc:
        text = str(exc)
        if not text.startswith("Caught ") or "Original Traceback" not in text:
            raise
        last = [line for line in text.splitlines() if line.strip()][-1]
        kind, _, message = last.partition(": ")
        if not message or kind.rpartition(".")[2] not in _DATA_ERRORS:
            raise  # not a data error: keep the worker's traceback for --debug
        raise ValueError(message) from None


# What a bad dataset raises in a worker (data/errors.py, data/paths.py, and a stale index).
_DATA_ERRORS = {"SampleError", "DatasetError", "ImageDecodeError", "UnsafeNameError",
                "ValueError"}


def _as_is(batch: dict) -> dict:
    return batch  # already collated; the default would turn tuples (orig_size, size) into lists


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)  # workers run in parallel already; avoid oversubscribing cores


def load_dataset_info(
    path: str | os.PathLike | Sequence[str], task: str | SampleSpec | None = None
) -> dict:
    """dataset.json of a shard folder (or next to explicit shard URLs), or the info of a raw folder.

    Raw folders have no dataset.json: their format is detected (a ``cf make-shapes`` folder holds
    several; ``task``'s formats pick one) and "num_samples" is the number of entries found.
    """
    urls = url_list(path)
    if urls is not None:
        return read_info_next_to(urls[0])
    index = Path(path) / "dataset.json"
    if index.is_file():
        return read_index(index)
    source = open_raw(path, task)
    return dict(source.info, num_samples=len(source))


def build_loader(path: str | os.PathLike | Sequence[str], task: str | SampleSpec,
                 spec: LoaderSpec, *, info: dict | None = None) -> Loader:  # fmt: skip
    """Loader of batch dicts (layout: ``clusterformer.data.collate``) for one rank, read as
    ``spec`` says (:class:`LoaderSpec`: batch size, image size, train or evaluation, workers,
    seed, rank, error policy, augmentation, normalisation, evaluation record).

    ``path``: a shard folder with dataset.json, explicit shard URLs (list / brace pattern /
    ``pipe:`` / http, dataset.json read next to them unless ``info`` is given), or a raw dataset
    folder. Images (B, 3, H, W) float32.
    """
    spec = spec.resolved()
    task_spec = sample_spec(task)
    has_index = url_list(path) is not None or (Path(path) / "dataset.json").is_file()
    source = shard_source(path, info) if has_index else RawSource(str(path), task_spec.formats)
    fmt = source.info.get("format")
    if fmt not in task_spec.formats:
        name = task if isinstance(task, str) else "this task"
        raise ValueError(f"{path}: a {fmt} dataset cannot be used for {name} "
                         f"(needs {' or '.join(task_spec.formats)})")  # fmt: skip
    total, world_size = sum(source.counts), spec.world_size
    steps = batches_per_rank(total, world_size, spec.batch_size, True, spec.drop_last)
    if spec.train and steps == 0:
        raise ValueError(f"{path}: {total} samples are fewer than world_size x batch_size = "
                         f"{world_size} x {spec.batch_size} = {world_size * spec.batch_size}, "
                         "one training batch; lower --batch-size (or use fewer processes)")  # fmt: skip
    dataset = StreamDataset(source, task_spec, spec)
    return Loader(dataset, spec.num_workers, source.info)
