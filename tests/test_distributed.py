"""Distributed training on 2 gloo processes equals one process over the same global batch.

The exactness test drives the engine's ``train_step`` with fixed tensors instead of the
shuffled loader: the loader's per-rank split is covered by the data tests, and a fixed
split lets us build the identical global batch in one process. Each rank gets half of the
global batch; DDP averages the gradients, which equals the full-batch mean loss's gradient
because both halves are the same size. Label smoothing, grad clipping and AdamW are on.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from cli_runner import run_cf_child, train_argv

STEPS = 3
GLOBAL_BATCH = 8


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _global_batch() -> dict:
    g = torch.Generator().manual_seed(123)
    return {
        "images": torch.randn(GLOBAL_BATCH, 3, 32, 32, generator=g),
        "pixel_mask": torch.ones(GLOBAL_BATCH, 32, 32, dtype=torch.bool),
        "labels": torch.randint(4, (GLOBAL_BATCH,), generator=g),
    }


def _state(model):
    from clusterformer.engine.checkpoint import TrainState
    from clusterformer.engine.optim import Schedule, build_optimizer

    opt = build_optimizer(model, lr=1e-3, weight_decay=0.05)
    return TrainState(
        model=model,
        module=model,
        optimizer=opt,
        schedule=Schedule(STEPS, 1, "cosine"),
        device=torch.device("cpu"),
        grad_clip=1.0,
    )


def _build():
    from clusterformer.tasks import build_task

    task = build_task("classification", 4, label_smoothing=0.1)
    torch.manual_seed(0)
    return task, task.build_model("clusterformer-nano")


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    torch.set_num_threads(1)
    from torch.nn.parallel import DistributedDataParallel

    from clusterformer.engine.distributed import (
        any_rank,
        cleanup_distributed,
        mean_across_ranks,
        setup_distributed,
    )
    from clusterformer.engine.step import train_step

    env = setup_distributed("cpu")
    try:
        assert env.world_size == world and env.rank == rank and env.initialized_here
        task, model = _build()
        if rank == 1:  # DDP must broadcast rank 0's initial weights
            with torch.no_grad():
                next(model.parameters()).add_(1.0)
        state = _state(model)
        state.model = DistributedDataParallel(model)
        batch = _global_batch()
        half = GLOBAL_BATCH // world
        local = {k: v[rank * half : (rank + 1) * half] for k, v in batch.items()}
        for _ in range(STEPS):
            train_step(state, task, [local])
        # Metrics reduce across ranks: rank r sees only its half.
        evaluator = task.evaluator()
        predicted = local["labels"] if rank == 0 else torch.zeros_like(local["labels"])
        evaluator.update(
            torch.nn.functional.one_hot(predicted, 4).float(), {"labels": local["labels"]}
        )
        metrics = evaluator.compute()
        extra = {
            "metrics": metrics,
            "any": any_rank(rank == 1, env),
            "mean": mean_across_ranks({"x": float(rank)}, env),
        }
        torch.save({"weights": model.state_dict(), **extra}, f"{out}.{rank}")
    finally:
        cleanup_distributed(env)


def test_two_gloo_processes_match_single_process(tmp_path: Path) -> None:
    out = str(tmp_path / "result")
    mp.spawn(_worker, args=(2, _free_port(), out), nprocs=2, join=True)
    from clusterformer.engine.step import train_step

    task, model = _build()
    state = _state(model)
    for _ in range(STEPS):
        train_step(state, task, [_global_batch()])
    reference = model.state_dict()
    for rank in range(2):
        got = torch.load(f"{out}.{rank}", weights_only=True)
        for name, value in reference.items():
            torch.testing.assert_close(
                got["weights"][name], value, rtol=1e-4, atol=1e-5, msg=f"rank {rank}: {name}"
            )
        assert got["any"] is True and got["mean"] == {"x": 0.5}
        # rank 0 predicts its labels perfectly, rank 1 predicts all zeros -> reduced top-1.
        labels = _global_batch()["labels"]
        expected = 100.0 * (4 + int((labels[4:] == 0).sum())) / 8
        assert got["metrics"]["top1"] == pytest.approx(expected)
        assert got["metrics"]["num_samples"] == 8


@pytest.mark.slow
def test_cf_train_under_torchrun(tmp_path: Path) -> None:
    """The real CLI under ``torchrun --standalone --nproc-per-node 2`` (gloo on CPU)."""
    from clusterformer.data.formats import open_source
    from clusterformer.data.shapes import make_shapes
    from clusterformer.data.shards import write_shards

    made = make_shapes(tmp_path / "raw", num_images=32, image_size=32, seed=0)
    write_shards(
        open_source("imagefolder", Path(made["classes"])),
        tmp_path / "shards",
        samples_per_shard=8,
    )
    run = tmp_path / "run"
    torchrun = ("-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2")
    done = run_cf_child(train_argv(tmp_path / "shards", run, 3, "--val-data", str(tmp_path / "shards"),
                                   log_every=1), launcher=torchrun)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    import json

    config = json.loads((run / "config.json").read_text())
    assert config["run"]["world_size"] == 2 and config["run"]["global_batch"] == 8
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["split"] == "train"] == [1, 2, 3]
    val = [r for r in records if r["split"] == "val"]
    assert val and val[-1]["num_samples"] == 32
    assert (run / "checkpoints" / "last.safetensors").is_file()


def test_group_store_skips_a_dead_groups_entry(monkeypatch: pytest.MonkeyPatch) -> None:
    """A restarted rank finds the previous group's store entry (a port nobody listens on any
    more) before the new rank 0 has published its own: it must wait for the live one, never
    use keys of the dead group (what broke gloo's connect after torchrun restarts)."""
    import threading
    from datetime import timedelta

    import torch.distributed as dist

    from clusterformer.engine.group_store import agent_store, group_store

    agent_server = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(agent_server.port))
    timeout = timedelta(seconds=600)  # a safety net: the wait ends when rank 0 publishes
    agent = agent_store(timeout)
    agent.set("clusterformer/group-store", f"{_free_port()} dead-group-nonce")  # the dead group's
    joined: dict = {}
    rank1 = threading.Thread(target=lambda: joined.update(store=group_store(
        agent_store(timeout), 1, 2, timeout)))  # fmt: skip
    rank1.start()
    time.sleep(3)  # not a clock it races: under load rank 1 only has had less time to go wrong
    assert rank1.is_alive()  # still waiting: the entry it found leads nowhere
    rank0 = group_store(agent, 0, 2, timeout)
    rank0.set("from-rank-0", "fresh")
    rank1.join(timeout=600)
    assert not rank1.is_alive() and joined["store"].get("from-rank-0") == b"fresh"
