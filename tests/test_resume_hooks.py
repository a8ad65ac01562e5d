"""Hooks keep their state across ``--resume``: the checkpoint's training state holds each hook's
``state_dict``, so the best metric and the patience counter of early stopping count on."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import pytest
import torch
from cli_runner import run_cf, train_argv

from clusterformer.engine import checkpoint as ckpt
from clusterformer.engine.optim import Schedule
from clusterformer.engine.trainer import HookBase


def _argv(shards: Path, run: Path, steps: int, *extra: str) -> list[str]:
    """A classification run evaluated at every step with patience 3. The lr is so small that
    the weights do not move, so every evaluation after the first is "no improvement"."""
    argv = train_argv(shards, run, steps, "--val-data", str(shards), "--eval-every", "1",
                      "--patience", "3", *extra)  # fmt: skip
    argv[argv.index("--lr") + 1] = "1e-12"
    return argv


def _cf(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str]:
    capsys.readouterr()
    code = run_cf(argv)
    out, err = capsys.readouterr()
    return code, out + err


def _evaluated_steps(run: Path) -> list[int]:
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in records if r.get("split") == "val"]


def test_patience_counts_on_after_resuming_a_finished_run(
    fault_shards: Path, fault_warm: None, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """Evaluations at steps 1 (the best) and 2 (one without improvement, after the final
    checkpoint); extended to 8 steps, the third evaluation without improvement is step 4.
    Counting afresh after the resume (the old behaviour) would stop at step 5."""
    run = tmp_path / "run"
    code, out = _cf(_argv(fault_shards, run, 2), capsys)
    assert code == 0, out
    assert "early stop" not in out and _evaluated_steps(run) == [1, 2]
    code, out = _cf(_argv(fault_shards, run, 8, "--resume"), capsys)
    assert code == 0, out
    assert "resumed" in out and "at step 2" in out
    assert "early stop at step 4: top1 has not improved for 3 evaluations" in out, out
    assert _evaluated_steps(run) == [1, 2, 3, 4]
    record = ckpt.load_state(run)["hooks"]["EvalHook"]["best"]
    assert record["stale"] == 3 and record["best_step"] == 1 and record["evaluated_step"] == 4
    code, out = _cf(_argv(fault_shards, run, 8, "--resume"), capsys)  # patience used up
    assert code == 0 and "raise --patience to train on" in out, out
    assert _evaluated_steps(run)[-1] == 4 and ckpt.load_state(run)["step"] == 4


def test_patience_after_a_kill_counts_the_replayed_evaluations_once(
    fault_shards: Path, fault_warm: None, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """A run killed while saving step 3 (its evaluation of step 3 done, the checkpoint of
    step 2 the newest) resumes from step 2 with the count of step 2 (one evaluation without
    improvement): it evaluates step 3 again and stops at step 4, not 5 (counting afresh) nor
    3 (counting step 3 twice)."""
    run = tmp_path / "run"
    code, out = _cf(_argv(fault_shards, run, 3, "--save-every", "1"), capsys)
    assert code == 0, out
    shutil.rmtree(run / "checkpoints" / "step-000003")
    code, out = _cf(_argv(fault_shards, run, 8, "--resume", "--save-every", "1"), capsys)
    assert code == 0, out
    assert "at step 2" in out and "early stop at step 4" in out, out
    assert _evaluated_steps(run) == [1, 2, 3, 3, 4]


class _Counter(HookBase):
    def __init__(self) -> None:
        self.count = 0

    def state_dict(self) -> dict:
        return {"count": self.count, "weights": torch.full((2,), float(self.count))}

    def load_state_dict(self, state: dict) -> None:
        self.count = int(state["count"])


def _state(seed: int) -> ckpt.TrainState:
    torch.manual_seed(seed)
    module = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-2)
    for group in optimizer.param_groups:
        group["initial_lr"] = group["lr"]
    return ckpt.TrainState(model=module, module=module, optimizer=optimizer,
                           schedule=Schedule(10, 0, "cosine"), device=torch.device("cpu"))  # fmt: skip


def test_train_state_round_trips_through_a_safe_load_with_every_hook(tmp_path: Path) -> None:
    state, first, second, plain = _state(0), _Counter(), _Counter(), HookBase()
    state.step, state.epoch, state.batches_in_epoch = 7, 1, 3
    first.count, second.count = 4, 9
    hooks = [first, plain, second]
    saved = state.state_dict(rngs=[ckpt.rng_state()], world_size=1, hooks=hooks)
    assert set(saved["hooks"]) == {"_Counter", "_Counter#2"}  # no entry for a stateless hook
    weights = ckpt.save_checkpoint(tmp_path, weights=state.module, metadata={}, state=saved,
                                   step=7)  # fmt: skip
    loaded = torch.load(io.BytesIO(ckpt.state_bytes(saved)), weights_only=True)
    again, hooks_again = _state(1), [_Counter(), HookBase(), _Counter()]
    again.load_state_dict(loaded, weights, rank=0, hooks=hooks_again)
    assert [h.count for h in hooks_again[::2]] == [4, 9]
    assert (again.step, again.epoch, again.batches_in_epoch) == (7, 1, 3)
    assert torch.equal(again.module.weight, state.module.weight)
