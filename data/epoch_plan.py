"""Which samples each (rank, loader worker) reads in one epoch: pure planning, no I/O.

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

The unit order is seeded from (seed, epoch) only, never from global state.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["WorkerPlan", "batches_per_rank", "plan_epoch"]


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
