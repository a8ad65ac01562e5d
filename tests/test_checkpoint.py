"""Checkpoints: safetensors + metadata round trip, atomic writes, pruning, weights-only state,
RNG state, and crash safety through the CLI (SIGKILL then --resume; SIGTERM saves)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_runner import CF_MODULE, train_argv
from torch import nn
from waiting import SAFETY_NET_S, wait_for_path

from clusterformer.engine import checkpoint as ckpt


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 2)
        self.model_config = {"name": "tiny"}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x)


def _make_shards(root: Path, n: int, seed: int) -> Path:
    from clusterformer.data.formats import open_source
    from clusterformer.data.shapes import make_shapes
    from clusterformer.data.shards import write_shards

    made = make_shapes(root / f"raw{seed}", num_images=n, image_size=32, seed=seed)
    write_shards(
        open_source("imagefolder", Path(made["classes"])),
        root / f"shards{seed}",
        samples_per_shard=16,
        seed=seed,
    )
    return root / f"shards{seed}"


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _make_shards(tmp_path_factory.mktemp("ckdata"), 32, 0)


def test_roundtrip_metadata_state_and_pruning(tmp_path: Path) -> None:
    model = Tiny()
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    meta = {
        "model_config": {"name": "tiny", "n": 2},
        "task": "classification",
        "categories": [{"id": 0, "name": "a"}],
        "image_size": 32,
        "normalisation": {"mean": [0.5] * 3, "std": [0.2] * 3},
    }
    for step in (1, 2, 3, 4):
        state = {"step": step, "optimizer": opt.state_dict(), "rng": [ckpt.rng_state()]}
        ckpt.save_checkpoint(
            tmp_path,
            weights=model,
            metadata=meta,
            state=state,
            step=step,
            periodic=True,
            keep_last=2,
        )
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["last", "last.safetensors", "last.state.pt", "step-000003", "step-000004"]
    assert sorted(p.name for p in (tmp_path / "step-000004").iterdir()) == [
        "checkpoint.json", "model.safetensors", "state.pt"]  # fmt: skip
    read = ckpt.read_metadata(tmp_path / "last.safetensors")
    assert read["model_config"] == meta["model_config"] and read["step"] == 4
    assert read["categories"] == meta["categories"] and read["image_size"] == 32
    other = Tiny()
    ckpt.load_weights(other, tmp_path / "last.safetensors")
    torch.testing.assert_close(other.lin.weight, model.lin.weight)
    state = torch.load(tmp_path / "last.state.pt", weights_only=True)
    assert state["step"] == 4
    torch.testing.assert_close(
        state["optimizer"]["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"]
    )
    found = ckpt.find_resumable(tmp_path)
    assert found is not None and found[0] == tmp_path / "step-000004" / "model.safetensors"


def test_resume_passes_over_an_unreadable_newest_checkpoint(tmp_path: Path) -> None:
    model = Tiny()
    meta = {"model_config": {}, "task": "classification"}
    for step in (5, 6):
        ckpt.save_checkpoint(tmp_path, weights=model, metadata=meta, state={"step": step},
                             step=step, periodic=True)  # fmt: skip
    (tmp_path / "step-000006" / "state.pt").write_bytes(b"damaged on disk")
    notes: list[str] = []
    weights, state = ckpt.find_resumable(tmp_path, notes)
    assert weights.parent.name == "step-000005" and state["step"] == 5
    assert len(notes) == 1 and "step-000006/state.pt" in notes[0]


def test_atomic_write_leaves_nothing_on_failure(tmp_path: Path) -> None:
    def boom(path: Path) -> None:
        path.write_text("partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        ckpt.atomic_write(tmp_path / "x.json", boom)
    assert list(tmp_path.iterdir()) == []


def test_rng_state_roundtrip(tmp_path: Path) -> None:
    state = ckpt.rng_state()
    draws = (random.random(), float(np.random.rand()), float(torch.rand(())))
    torch.save(state, tmp_path / "rng.pt")
    ckpt.set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert (random.random(), float(np.random.rand()), float(torch.rand(()))) == draws


def test_not_a_checkpoint_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no checkpoints"):
        ckpt.resolve_checkpoint(tmp_path)
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(tmp_path / "w.safetensors"))
    with pytest.raises(ValueError, match="not a clusterformer checkpoint"):
        ckpt.read_metadata(tmp_path / "w.safetensors")


def _train_cmd(data: Path, out: Path, steps: int, *extra: str) -> list[str]:
    return [sys.executable, *CF_MODULE, *train_argv(data, out, steps, *extra, log_every=1)]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def test_sigkill_then_resume_continues_at_saved_step(shards: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    proc = subprocess.Popen(
        _train_cmd(shards, run, 10_000, "--save-every", "2"),
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_for_path(run / "checkpoints" / "step-000002", proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=SAFETY_NET_S)
    weights, saved = ckpt.find_resumable(run / "checkpoints")
    step = int(saved["step"])
    assert step >= 2 and step % 2 == 0
    lines_before = len((run / "metrics.jsonl").read_text().splitlines())
    # Resume to exactly the saved step: nothing trains, the re-saved state must be identical.
    done = subprocess.run(
        _train_cmd(shards, run, step, "--resume"),
        env=_env(),
        capture_output=True,
        text=True,
        timeout=SAFETY_NET_S,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads((run / "config.json").read_text())["run"]["resumed_from_step"] == step
    again = torch.load(run / "checkpoints" / "last.state.pt", weights_only=True)
    assert again["step"] == step and again["epoch"] == saved["epoch"]
    assert again["batches_in_epoch"] == saved["batches_in_epoch"]
    for key, value in saved["optimizer"]["state"].items():
        for name in ("exp_avg", "exp_avg_sq", "step"):
            torch.testing.assert_close(again["optimizer"]["state"][key][name], value[name])
    # Two more steps continue from step + 1.
    done = subprocess.run(
        _train_cmd(shards, run, step + 2, "--resume"),
        env=_env(),
        capture_output=True,
        text=True,
        timeout=SAFETY_NET_S,
    )
    assert done.returncode == 0, done.stderr
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records[lines_before:]] == [step + 1, step + 2]
    assert ckpt.read_metadata(run)["step"] == step + 2


def test_sigterm_saves_a_loadable_checkpoint(shards: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    proc = subprocess.Popen(
        _train_cmd(shards, run, 10_000),
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_for_path(run / "metrics.jsonl", proc)  # the first step is done
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=SAFETY_NET_S)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "SIGTERM received: saved a checkpoint" in err
    from clusterformer.engine.evaluate import load_model_from_checkpoint

    model, task, meta = load_model_from_checkpoint(run)
    state = ckpt.load_state(run)
    assert meta["step"] == state["step"] >= 1 and task.name == "classification"
    assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 4)


@pytest.mark.parametrize("durable", [True, False])
def test_atomic_write_syncs_only_when_durable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, durable: bool) -> None:
    from clusterformer.engine import files

    synced: list[int] = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd))[1])
    target = tmp_path / "out" / "a.json"
    files.atomic_write_json(target, {"x": 1}, durable=durable)
    assert json.loads(target.read_text()) == {"x": 1}
    assert [p.name for p in target.parent.iterdir()] == ["a.json"]  # no temporary left
    assert (len(synced) == 2) if durable else not synced  # the file, then its folder
