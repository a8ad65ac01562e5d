"""Rank/worker splitting: exactly-once evaluation, equal batch counts per rank, real workers."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from clusterformer.data import LoaderSpec, build_loader
from clusterformer.data.epoch_plan import batches_per_rank, plan_epoch
from clusterformer.data.shapes import make_shapes
from clusterformer.data.shards import write_shards
from clusterformer.data.streams import open_raw


def _positions(plan, counts: list[int]) -> list[int]:
    """Global positions a worker plan keeps over one pass of its units."""
    out = []
    for unit, start in zip(plan.units, plan.starts, strict=True):
        out += [p for p in range(start, start + counts[unit]) if plan.keeps(p)]
    return out


plan_args = {
    "counts": st.lists(st.integers(0, 13), min_size=1, max_size=9).filter(lambda c: sum(c) > 0),
    "world": st.integers(1, 4),
    "workers": st.integers(0, 3),
    "batch": st.integers(1, 5),
    "epoch": st.integers(0, 3),
}


@settings(max_examples=150, deadline=None)
@given(**plan_args, drop_last=st.booleans())
def test_eval_plan_reads_every_sample_once_with_equal_batches(
    counts: list[int], world: int, workers: int, batch: int, epoch: int, drop_last: bool
) -> None:
    kw = {"world_size": world, "num_workers": workers, "batch_size": batch, "train": False,
          "drop_last": drop_last, "epoch": epoch}  # fmt: skip
    plans = [plan_epoch(counts, rank=r, **kw) for r in range(world)]
    seen = Counter()
    for rank_plans in plans:
        for p in rank_plans:
            got = _positions(p, counts)
            assert len(got) == p.num_samples
            seen.update(got)
    assert seen == Counter(range(sum(counts)))
    totals = {sum(p.num_batches + p.pad_batches for p in rp) for rp in plans}
    assert len(totals) == 1


@settings(max_examples=150, deadline=None)
@given(**plan_args, drop_last=st.booleans())
def test_train_plan_gives_every_rank_the_same_full_batches(
    counts: list[int], world: int, workers: int, batch: int, epoch: int, drop_last: bool
) -> None:
    steps = batches_per_rank(sum(counts), world, batch, True, drop_last)
    kw = {"world_size": world, "num_workers": workers, "batch_size": batch, "train": True,
          "drop_last": drop_last, "epoch": epoch}  # fmt: skip
    seen = Counter()
    for r in range(world):
        rank_plans = plan_epoch(counts, rank=r, **kw)
        assert sum(p.num_batches for p in rank_plans) == steps
        for p in rank_plans:
            # A worker asked for batches always has samples to draw (and wrap around) from.
            assert p.pad_batches == 0 and (p.num_batches == 0 or p.num_samples > 0)
            got = _positions(p, counts)
            assert len(got) == p.num_samples
            if drop_last or world * steps * batch <= sum(counts):  # no wrap: exactly its batches
                assert len(got) == p.num_batches * batch
            seen.update(got)
    used = world * steps * batch
    if drop_last:  # each position at most once; all but the last N mod (R x B) of the epoch
        assert set(seen.values()) <= {1} and sum(seen.values()) == used
        assert sum(counts) - used < world * batch
    else:  # every position; the last uneven batch filled from the epoch's start
        assert set(seen) == set(range(sum(counts)))


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("workers", [0, 1, 2])
@pytest.mark.parametrize("layout", ["five", "two"])  # 5 shards; 2 shards (fewer than slots)
def test_train_epoch_reads_each_sample_once_across_ranks_and_workers(
    uneven: dict[str, Path], layout: str, world: int, workers: int
) -> None:
    """Real loaders (DataLoader workers included): the sample keys of every rank's epoch 1.
    23 samples, batch 3: each key at most once; the ``23 mod (world x 3)`` left out are the
    stated remainder of the epoch (drop_last). Fails on the loader before this change, which
    gave each rank whole shards and let a rank with fewer samples repeat some."""
    keys, lengths = Counter(), set()
    for rank in range(world):
        spec = LoaderSpec(batch_size=3, image_size=16, train=True, num_workers=workers, rank=rank,
                          world_size=world, seed=7)  # fmt: skip
        loader = build_loader(uneven[layout], "classification", spec)
        loader.set_epoch(1)
        batches = list(loader)
        lengths.add(len(batches))
        rank_keys = [k for b in batches for k in b["keys"]]
        print(f"{layout} world {world} workers {workers} rank {rank}: {sorted(rank_keys)}")
        keys.update(rank_keys)
    steps = 23 // (world * 3)
    assert lengths == {steps}
    assert set(keys.values()) == {1}, keys.most_common(3)
    assert sum(keys.values()) == world * steps * 3 and 23 - len(keys) < world * 3


def test_train_shard_order_changes_with_epoch() -> None:
    kw = {"rank": 0, "world_size": 1, "num_workers": 0, "batch_size": 1, "train": True,
          "drop_last": True}  # fmt: skip
    orders = {plan_epoch([3] * 8, epoch=e, **kw)[0].units for e in range(4)}
    assert len(orders) > 1


@pytest.fixture(scope="module")
def uneven(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """23 classification samples: 5 shards of 5/5/5/5/3, and 2 shards of 12/11."""
    root = tmp_path_factory.mktemp("dist")
    make_shapes(root / "raw", num_images=23, image_size=32, seed=5)
    out = {}
    for name, per_shard in (("five", 5), ("two", 12)):
        out[name] = root / name
        write_shards(open_raw(root / "raw", "classification"), out[name],
                     samples_per_shard=per_shard, seed=2)  # fmt: skip
    return out


def _epoch(path: Path, rank: int, train: bool, epoch: int = 0, batch: int = 3) -> list[dict]:
    spec = LoaderSpec(batch_size=batch, image_size=16, train=train, num_workers=2, rank=rank,
                      world_size=2, seed=7)  # fmt: skip
    loader = build_loader(path, "classification", spec)
    loader.set_epoch(epoch)
    batches = list(loader)
    assert len(batches) == len(loader)
    return batches


@pytest.mark.parametrize("layout", ["five", "two"])  # shard mode and sample mode (2 < 2 x 2)
def test_two_nodes_two_workers_eval_sees_every_sample_once(
    uneven: dict[str, Path], layout: str
) -> None:
    keys, lengths = Counter(), set()
    for rank in (0, 1):
        batches = _epoch(uneven[layout], rank, train=False)
        lengths.add(len(batches))
        for b in batches:
            keys.update(k for k, v in zip(b["keys"], b["valid"].tolist(), strict=True) if v)
    assert len(lengths) == 1
    assert len(keys) == 23 and set(keys.values()) == {1}


def test_two_nodes_two_workers_train_equal_full_batches(uneven: dict[str, Path]) -> None:
    per_rank = [_epoch(uneven["five"], rank, train=True) for rank in (0, 1)]
    assert len(per_rank[0]) == len(per_rank[1]) == 23 // (2 * 3)
    for batches in per_rank:
        assert all(b["images"].shape[0] == 3 and b["valid"].all() for b in batches)
        assert all(b["labels"].dtype == torch.int64 for b in batches)
    # Different epochs give each rank different samples or order.
    again = _epoch(uneven["five"], 0, train=True, epoch=1)
    assert [b["keys"] for b in again] != [b["keys"] for b in per_rank[0]]
