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
    assert "torchrun restart 1: continuing" in text
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
