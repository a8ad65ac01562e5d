"""torchrun's elastic agent restarts a failed worker group; the run continues by itself.

Two gloo workers on CPU train 30 steps with a checkpoint every 5. One worker is SIGKILLed
mid-run (or rank 0 halfway through writing a checkpoint); ``--max-restarts 2`` starts a new
group, which resumes the newest complete checkpoint without ``--resume`` and rejoins the
process group. The final weights must be *bit-equal* to an uninterrupted run's with the same
seed (tolerance 0): a checkpoint holds everything the steps after it depend on (weights,
AdamW moments, every rank's RNG, the loader position; the loader's order and augmentation
are seeded from (seed, epoch, rank, worker)), and two gloo ranks sum gradients in a fixed
order, so the replayed steps compute the same floats.

Before the fix these fail: the restarted group refused the folder ("already holds a
checkpoint; pass --resume"), and with ``--resume`` a restarted rank could read the dead
group's gloo address from torchrun's shared store ("Connection refused" in connectFullMesh).
"""

from __future__ import annotations

import json
import socket
import sys
from pathlib import Path

import pytest
import torch
from cli_runner import CF_MODULE, train_argv
from elastic_kit import (
    TESTS,
    final_weights,
    finish,
    kill_worker,
    start,
    torchrun,
    trained_steps,
    wait_for_step,
)

pytestmark = pytest.mark.slow

STEPS = 30


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from clusterformer.data.formats import open_source
    from clusterformer.data.shapes import make_shapes
    from clusterformer.data.shards import write_shards

    root = tmp_path_factory.mktemp("elastic")
    made = make_shapes(root / "raw", num_images=48, image_size=32, seed=0)
    write_shards(open_source("imagefolder", Path(made["classes"])), root / "shards",
                 samples_per_shard=8)  # fmt: skip
    return root / "shards"


def _args(shards: Path, run: Path) -> list[str]:
    return train_argv(shards, run, STEPS, "--save-every", "5", log_every=1)


@pytest.fixture(scope="module")
def uninterrupted(shards: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    run = tmp_path_factory.mktemp("reference") / "run"
    log = run.parent / "torchrun.log"
    text = finish(start([*torchrun(2), *CF_MODULE, *_args(shards, run)], log), log)
    assert "trained 30 steps" in text, text[-3000:]
    return final_weights(run)


def _assert_bit_equal(got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want)
    for name in want:
        assert torch.equal(got[name], want[name]), name


def test_worker_killed_mid_run_restarts_and_finishes(
    shards: Path, uninterrupted: dict, tmp_path: Path
) -> None:
    run, log = tmp_path / "run", tmp_path / "torchrun.log"
    agent = start([*torchrun(2, "--max-restarts", "2"), *CF_MODULE, *_args(shards, run)], log)
    wait_for_step(run, 12, agent, log)  # after the step-10 checkpoint, before step 15's
    kill_worker(agent)
    text = finish(agent, log)
    assert agent.returncode == 0, text[-4000:]
    assert "torchrun restarted the workers: continuing" in text
    resumed = [line for line in text.splitlines() if line.startswith("resumed ")]
    assert resumed and "at step 10 " in resumed[0] or "at step 15 " in resumed[0], resumed
    assert max(trained_steps(run)) == STEPS
    _assert_bit_equal(final_weights(run), uninterrupted)


def test_rank0_killed_during_a_checkpoint_write_restarts_and_finishes(
    shards: Path, uninterrupted: dict, tmp_path: Path
) -> None:
    run, log = tmp_path / "run", tmp_path / "torchrun.log"
    child = [str(TESTS / "elastic_child.py"), str(run)]
    agent = start([*torchrun(2, "--max-restarts", "2"), *child, *_args(shards, run)], log,
                  env={"CF_TEST_DIE_IN_SAVE": "15"})  # fmt: skip
    text = finish(agent, log)
    assert agent.returncode == 0, text[-4000:]
    resumed = [line for line in text.splitlines() if line.startswith("resumed ")]
    assert resumed and "at step 10 " in resumed[0], text[-4000:]  # step 15's was torn: not used
    _assert_bit_equal(final_weights(run), uninterrupted)


def test_first_start_still_refuses_a_run_with_a_checkpoint(shards: Path, tmp_path: Path) -> None:
    """Under torchrun, restart count 0: the folder of a finished run is not overwritten."""
    run, log = tmp_path / "run", tmp_path / "torchrun.log"
    args = train_argv(shards, run, 2)
    assert "trained 2 steps" in finish(start([*torchrun(1), *CF_MODULE, *args], log), log)
    agent = start([*torchrun(2, "--max-restarts", "1"), *CF_MODULE, *args], log)
    text = finish(agent, log)
    assert agent.returncode != 0
    assert "already holds a checkpoint; pass --resume" in text


# (processes, extra flags, steps) of the first run, then of the resumed one; the start line;
# the resumed run's accumulation, global batch and steps per epoch. Before, a resume kept the
# old accumulation (a global batch of 4, resp. 8) and said nothing.
WORLD_CHANGES = {
    "fewer": ((2, ("--save-every", "6"), 6), (1, 12),
              "world size 2 -> 1: gradient accumulation 1 -> 2 keeps the global batch of 8", (2, 8, 6)),
    "more": ((1, ("--accum-steps", "4"), 3), (2, 6),
             "world size 1 -> 2: gradient accumulation 4 -> 2 keeps the global batch of 16", (2, 16, 3)),
}  # fmt: skip


@pytest.mark.parametrize("change", WORLD_CHANGES)
def test_resume_on_another_world_size_keeps_the_global_batch(shards: Path, tmp_path: Path,
                                                             change: str) -> None:  # fmt: skip
    """Train to the end of an epoch (48 samples), resume on another number of processes (a
    node gone, a node joined): gradient accumulation keeps the global batch, said on the start
    line and recorded, and the next epoch starts afresh."""
    (procs, flags, steps), (more_procs, total), line, (accum, batch, per_epoch) = WORLD_CHANGES[change]
    run, log = tmp_path / "run", tmp_path / "torchrun.log"
    first = start([*torchrun(procs), *CF_MODULE, *train_argv(shards, run, steps, *flags)], log)
    assert f"trained {steps} steps" in finish(first, log)
    more = start([*torchrun(more_procs), *CF_MODULE, *train_argv(shards, run, total, "--resume")], log)
    text = finish(more, log)
    assert more.returncode == 0, text[-3000:]
    assert line in text
    config = json.loads((run / "config.json").read_text())
    assert config["optim"]["accum_steps"] == accum and config["run"]["global_batch"] == batch
    assert config["run"]["world_size"] == more_procs and config["run"]["steps_per_epoch"] == per_epoch
    assert max(trained_steps(run)) == total


def test_resume_mid_epoch_on_another_world_size_is_refused(shards: Path, tmp_path: Path) -> None:
    run, log = tmp_path / "run", tmp_path / "torchrun.log"
    first = start([*torchrun(2), *CF_MODULE, *train_argv(shards, run, 4)], log)
    assert "trained 4 steps" in finish(first, log)
    more = start([*torchrun(1), *CF_MODULE, *train_argv(shards, run, 12, "--resume")], log)
    text = finish(more, log)
    assert more.returncode == 1
    assert "written by 2 processes, resumed on 1 mid-epoch (epoch 0, batch 4 of 6)" in text


def _two_nodes(*flags: str) -> list[str]:
    """A torchrun agent for one of two local "nodes" (one worker each) meeting at a c10d
    rendezvous on localhost."""
    with socket.socket() as s:  # the rendezvous endpoint both agents must be told
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node",
            "1", "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}",
            "--rdzv-id", "two-nodes", *flags]  # fmt: skip


def test_two_local_nodes_train_and_evaluate_one_run(shards: Path, tmp_path: Path) -> None:
    """Two torchrun agents as two nodes (--nnodes 2, c10d rendezvous on localhost), one worker
    each: one run folder, one writer, evaluation over both ranks."""
    run = tmp_path / "run"
    args = train_argv(shards, run, 6, "--val-data", str(shards), "--save-every", "3", log_every=1)
    node = _two_nodes()
    logs = [tmp_path / "node0.log", tmp_path / "node1.log"]
    agents = [start([*node, *CF_MODULE, *args], log) for log in logs]
    texts = [finish(agent, log) for agent, log in zip(agents, logs, strict=True)]
    assert [a.returncode for a in agents] == [0, 0], texts
    config = json.loads((run / "config.json").read_text())
    assert config["run"]["world_size"] == 2 and config["run"]["global_batch"] == 8
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["split"] == "train"] == [1, 2, 3, 4, 5, 6]
    val = [r for r in records if r["split"] == "val"]
    assert val and val[-1]["num_samples"] == 48  # every sample once over the two ranks
    assert sum("trained 6 steps" in t for t in texts) == 1  # rank 0's summary only


def test_two_local_nodes_survive_a_worker_kill(
    shards: Path, uninterrupted: dict, tmp_path: Path
) -> None:
    """The worker of one "node" is SIGKILLed mid-run: its agent restarts it, the other agent
    restarts its worker at the new rendezvous round, and the run ends bit-equal to the
    uninterrupted 2-process run (the same two ranks, whichever agent holds them)."""
    run = tmp_path / "run"
    node = _two_nodes("--max-restarts", "2")
    logs = [tmp_path / "node0.log", tmp_path / "node1.log"]
    agents = [start([*node, *CF_MODULE, *_args(shards, run)], log) for log in logs]
    wait_for_step(run, 12, agents[1], logs[1])
    kill_worker(agents[1])
    texts = [finish(agent, log) for agent, log in zip(agents, logs, strict=True)]
    assert [a.returncode for a in agents] == [0, 0], [t[-3000:] for t in texts]
    assert any("torchrun restarted the workers: continuing" in t for t in texts)
    _assert_bit_equal(final_weights(run), uninterrupted)
