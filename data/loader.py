"""Streaming loader: shards (or a raw dataset folder) -> decode -> transform -> padded batches.

Splitting. The dataset is a list of *units* (tar shards, or fixed-size chunks of a raw folder)
with known sample counts (dataset.json). With R ranks x W workers = S slots:

* ``units >= S`` (shard mode): rank r reads units ``order[r::R]``, its worker w ``[w::W]`` of those;
* ``units < S`` (sample mode): every slot reads every unit but keeps only the samples whose
  global position p has ``p % S == w * R + r`` (tar members of other samples are skipped unread).

Equal batches per rank, so no collective ever waits on a rank that has stopped:

* training: ``len = floor(N / (R * B))`` (``ceil`` with ``drop_last=False``) and every sample
  at most once per epoch across ranks and workers. The unit order is shuffled per (seed,
  epoch) and lays the epoch's samples out as positions 0..N-1; each rank's batches are shared
  evenly among its workers, and each slot (rank, worker) takes a contiguous range of
  positions, exactly its batches' worth, reading only the units that overlap it (a unit is
  read by at most the few slots whose ranges meet in it). The last ``N mod (R * B)`` positions
  are left out of that epoch (a different remainder each epoch, as the unit order changes);
  with ``drop_last=False`` the last uneven batch is filled from the start of the epoch
  instead, so ``R * B * len - N`` samples are seen twice. Only a worker that had to skip
  bad samples (``on_error="skip"``) wraps around its units to fill its batches;
* evaluation: every sample is read exactly once across ranks, in dataset order. Ranks that have
  fewer batches than ``len = max over ranks`` add *padding batches*: one copy of a real sample
  with ``batch["valid"] == [False]``. Metrics must skip entries whose valid flag is False.

Randomness (shard order, shuffle buffer, transforms) is seeded from (seed, epoch, rank, worker)
only, never from global state, so the same arguments give the same batches.
"""

from __future__ import annotations

import math
import os
import random
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .collate import collate
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

__all__ = ["Loader", "LoaderSpec", "WorkerPlan", "batches_per_rank", "build_loader",
           "load_dataset_info"]  # fmt: skip


# --------------------------------------------------------------------------- planning (pure)
@dataclass(frozen=True)
class WorkerPlan:
    """What one DataLoader worker of one rank reads and yields in one epoch.

    ``units``/``starts``: unit indices in read order and their first global position;
    keep a sample at global position p iff ``p % stride == offset`` and p lies in one of
    ``ranges`` (half-open ``(lo, hi)``; empty: anywhere); ``num_samples`` of them exist.
    ``num_batches`` come from real samples, ``pad_batches`` (evaluation only) are padding.
    """

    units: tuple[int, ...]
    starts: tuple[int, ...]
    stride: int
    offset: int
    num_samples: int
    num_batches: int
    pad_batches: int = 0
    ranges: tuple[tuple[int, int], ...] = ()

    def keeps(self, position: int) -> bool:
        """Whether this worker reads the sample at global ``position``."""
        if position % self.stride != self.offset:
            return False
        return not self.ranges or any(lo <= position < hi for lo, hi in self.ranges)


def _unit_order(num_units: int, train: bool, seed: int, epoch: int) -> list[int]:
    order = list(range(num_units))
    if train:
        random.Random(f"units-{seed}-{epoch}").shuffle(order)
    return order


def _slot_reads(
    counts: Sequence[int], order: list[int], rank: int, world: int, workers: int
) -> list[tuple[tuple[int, ...], tuple[int, ...], int, int, int]]:
    """Per worker of ``rank``: (units, starts, stride, offset, num_samples)."""
    total = sum(counts)
    starts, pos = {}, 0
    for u in order:
        starts[u] = pos
        pos += counts[u]
    slots = world * workers
    out = []
    for w in range(workers):
        if len(order) >= slots:
            units = tuple(order[rank::world][w::workers])
            out.append(
                (units, tuple(starts[u] for u in units), 1, 0, sum(counts[u] for u in units))
            )
        else:
            slot = w * world + rank
            n = total // slots + (slot < total % slots)
            out.append((tuple(order), tuple(starts[u] for u in order), slots, slot, n))
    return out


def _share(total: int, weights: Sequence[int]) -> list[int]:
    """Split ``total`` into integers proportional to ``weights`` (largest remainder)."""
    wsum = sum(weights)
    exact = [total * w / wsum for w in weights]
    out = [math.floor(x) for x in exact]
    by_remainder = sorted(range(len(weights)), key=lambda i: (out[i] - exact[i], i))
    for i in by_remainder[: total - sum(out)]:
        out[i] += 1
    return out


def _wrapped(lo: int, hi: int, total: int) -> tuple[tuple[int, int], ...]:
    """Positions ``lo..hi`` of an epoch laid end to end with itself, as ranges of 0..total."""
    if hi - lo >= total:
        return ((0, total),)
    lo, hi = lo % total, lo % total + (hi - lo)
    return ((lo, hi),) if hi <= total else ((lo, total), (0, hi - total))


def _train_plans(counts: Sequence[int], order: list[int], rank: int, world: int, workers: int,
                 batch_size: int, drop_last: bool) -> list[WorkerPlan]:  # fmt: skip
    """Training: slot (rank, worker) takes the contiguous position range its batches need,
    slots in (rank, worker) order (see the module docstring)."""
    total = sum(counts)
    steps = batches_per_rank(total, world, batch_size, True, drop_last)
    shares = _share(steps, [1] * workers)  # the same for every rank
    starts, pos = {}, 0
    for u in order:
        starts[u] = pos
        pos += counts[u]
    lo = rank * steps * batch_size
    plans = []
    for batches in shares:
        hi = lo + batches * batch_size
        ranges = _wrapped(lo, hi, total) if hi > lo else ()
        units = tuple(u for u in order if counts[u] and any(
            a < starts[u] + counts[u] and starts[u] < b for a, b in ranges))  # fmt: skip
        kept = sum(min(b, starts[u] + counts[u]) - max(a, starts[u])
                   for u in units for a, b in ranges if a < starts[u] + counts[u] and starts[u] < b)  # fmt: skip
        plans.append(WorkerPlan(units, tuple(starts[u] for u in units), 1, 0, kept,
                                num_batches=batches, ranges=ranges or ((0, 0),)))  # fmt: skip
        lo = hi
    return plans


def batches_per_rank(
    num_samples: int, world_size: int, batch_size: int, train: bool, drop_last: bool
) -> int:
    """Training batches per rank per epoch (evaluation: see ``plan_epoch``)."""
    per_step = world_size * batch_size
    return num_samples // per_step if drop_last else -(-num_samples // per_step)


def plan_epoch(
    counts: Sequence[int],
    *,
    rank: int,
    world_size: int,
    num_workers: int,
    batch_size: int,
    train: bool,
    drop_last: bool,
    seed: int = 0,
    epoch: int = 0,
) -> list[WorkerPlan]:
    """One ``WorkerPlan`` per worker of ``rank``; the batch totals match on every rank."""
    workers = max(1, num_workers)
    order = _unit_order(len(counts), train, seed, epoch)
    if train:
        return _train_plans(counts, order, rank, world_size, workers, batch_size, drop_last)
    reads = _slot_reads(counts, order, rank, world_size, workers)

    def real(n: int) -> int:
        return n // batch_size if drop_last else -(-n // batch_size)

    steps = max(
        sum(real(r[4]) for r in _slot_reads(counts, order, k, world_size, workers))
        for k in range(world_size)
    )
    missing = steps - sum(real(r[4]) for r in reads)
    return [
        WorkerPlan(
            *r, num_batches=real(r[4]), pad_batches=missing // workers + (w < missing % workers)
        )
        for w, r in enumerate(reads)
    ]


# --------------------------------------------------------------------------- dataset
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
