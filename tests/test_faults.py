"""The fault matrix of issue 14: kills, bad records, full disks, hostile files, diverged runs.

One test (or a parametrized family) per defect of the issue:

1. a kill at any file operation of a checkpoint write leaves a resumable run (``kill_points``)
2. no file a command or public loader accepts can run code (malicious pickles everywhere)
3. ``--resume`` never starts over on a folder that holds weights; ``--restart`` does
4. duplicate COCO image ids, 5. NaN anywhere in an annotation: one line or a counted skip
6. a diverged run never replaces the last good checkpoint; eval / predict refuse it
7. a failed re-shard leaves the previous dataset in ``--out`` as it was
8. full disk / unwritable ``--out``: found before step 1, one line naming the path
9. every error line names the file (and sample) and the fix, under 300 characters
10. no leftovers (temporaries of dead writers, partial predictions); exit code 2 = usage
11. waits in tests are safety nets, not speed checks (see ``waiting.py``)

The hostile and broken inputs (2, 4, 5, 7, 9 and exit codes) are in test_faults_input.py,
the full disks (8) in test_faults_disk.py; shared helpers in fault_kit.py, fault injection in kill_points.py, fixtures in conftest.py.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from cli_runner import train_argv
from fault_kit import (
    assert_same_weights,
    cf,
    dotfiles,
    error_line,
    snapshot,
    strict_json,
    weights_of,
)
from kill_points import WHEN, FileOps, count_ops, in_child
from safetensors.torch import load_file, save_file

from clusterformer.cli.app import main
from clusterformer.engine import checkpoint as ckpt

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="fault injection forks")


# ----------------------------------------------------------------------------- 1. kills
class _Tiny(torch.nn.Module):
    def __init__(self, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.lin = torch.nn.Linear(3, 2)
        self.model_config = {"name": "tiny"}


def _save_tiny(folder: Path, step: int, model: _Tiny) -> None:
    ckpt.save_checkpoint(folder, weights=model, metadata={"model_config": {}, "task": "x"},
                         state={"step": step, "w": model.lin.weight.detach().clone()},
                         step=step, periodic=True, keep_last=1)  # fmt: skip


def test_a_kill_at_any_file_operation_of_a_save_leaves_a_resumable_folder(tmp_path: Path) -> None:
    """Every file operation of the writer, killed before, after or halfway (writes): the folder
    then holds the old or the new checkpoint, whole, and the next start tidies it."""
    old, new = _Tiny(0), _Tiny(1)
    template = tmp_path / "template"
    _save_tiny(template, 1, old)
    probe = tmp_path / "probe"
    shutil.copytree(template, probe, symlinks=True)
    ops = count_ops(probe, lambda _: _save_tiny(probe, 2, new))
    assert {"write", "replace", "symlink"} <= {name for name, _ in ops}
    for k, (name, _) in enumerate(ops, start=1):
        for when in WHEN:
            if when == "torn" and name != "write":
                continue
            folder = tmp_path / f"{k}-{when}"
            shutil.copytree(template, folder, symlinks=True)

            def killed(folder: Path = folder, k: int = k, when: str = when) -> None:
                FileOps(folder, k, when).install()
                _save_tiny(folder, 2, new)

            assert in_child(killed) == -signal.SIGKILL, (k, when)
            ckpt.recover(folder)
            assert dotfiles(folder) == [], (k, when, ops[k - 1])
            weights, state = ckpt.find_resumable(folder)
            expected = old if state["step"] == 1 else new
            assert torch.equal(load_file(str(weights))["lin.weight"], expected.lin.weight)
            assert torch.equal(state["w"], expected.lin.weight), (k, when)
            assert ckpt.resolve_checkpoint(folder) == weights  # `last` is the newest
            _save_tiny(folder, 3, new)  # and the run goes on
            assert ckpt.find_resumable(folder)[1]["step"] == 3 and dotfiles(folder) == []


def _commit_points(ops: list[tuple[str, str]], every: bool) -> list[tuple[int, str]]:
    """Kill points: all of them, or three that stand for the rest (just before and just after
    the first rename, a torn write in the last save); the unit test above tries every point
    of the writer."""
    points = [(k, when) for k, (name, _) in enumerate(ops, 1) for when in WHEN
              if when != "torn" or name == "write"]  # fmt: skip
    if every:
        return points
    renames = [k for k, (name, _) in enumerate(ops, 1) if name in ("replace", "rename")]
    writes = [k for k, (name, _) in enumerate(ops, 1) if name == "write"]
    return [(renames[0], "before"), (renames[0], "after")] + [(k, "torn") for k in writes[-2:-1]]


def _kill_then_resume(fault_shards: Path, run: Path, k: int, when: str, first: list[str],
                      resume: list[str]) -> None:  # fmt: skip
    def killed() -> None:
        FileOps(run / "checkpoints", k, when).install()
        main(first)

    assert in_child(killed) == -signal.SIGKILL, (k, when)
    assert in_child(lambda: main(resume)) == 0, (k, when)


@pytest.fixture(scope="module")
def uninterrupted(
    fault_shards: Path, fault_warm: None, tmp_path_factory: pytest.TempPathFactory
) -> dict:
    run = tmp_path_factory.mktemp("uninterrupted") / "run"
    assert in_child(lambda: main(train_argv(fault_shards, run, 4, "--save-every", "2"))) == 0
    return weights_of(run)


def _killed_train_matches_uninterrupted(fault_shards: Path, uninterrupted: dict, tmp_path: Path,
                                        every: bool) -> None:  # fmt: skip
    argv = train_argv(fault_shards, tmp_path / "count", 4, "--save-every", "2")
    ops = count_ops(tmp_path / "count" / "checkpoints", lambda _: main(argv))
    for k, when in _commit_points(ops, every):
        run = tmp_path / f"{k}-{when}"
        argv = train_argv(fault_shards, run, 4, "--save-every", "2")
        _kill_then_resume(fault_shards, run, k, when, argv, [*argv, "--resume"])
        assert_same_weights(weights_of(run), uninterrupted)
        assert dotfiles(run / "checkpoints") == [], (k, when)


def test_killed_train_resumes_to_the_weights_of_an_uninterrupted_run(
    fault_shards: Path, uninterrupted: dict, tmp_path: Path
) -> None:
    """`cf train` killed at one of each kind of file operation of its saves, then --resume:
    the final weights are those of a run never killed (all points: the slow test below)."""
    _killed_train_matches_uninterrupted(fault_shards, uninterrupted, tmp_path, every=False)


@pytest.mark.slow
def test_killed_train_at_every_point_resumes_to_the_same_weights(
    fault_shards: Path, uninterrupted: dict, tmp_path: Path
) -> None:
    _killed_train_matches_uninterrupted(fault_shards, uninterrupted, tmp_path, every=True)


@pytest.mark.parametrize("every", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_a_kill_between_the_files_of_a_resumed_runs_save_stays_resumable(
    fault_shards: Path, fault_warm: None, tmp_path: Path, every: bool
) -> None:
    """The issue's case: a resumed run killed while saving, after the first rename of its
    final save (``every``: after each one), must not leave weights and state of different
    steps behind; resuming again gives the weights of the run never killed."""
    base = tmp_path / "base"
    assert in_child(lambda: main(train_argv(fault_shards, base, 2))) == 0
    reference = tmp_path / "reference"
    shutil.copytree(base, reference, symlinks=True)
    assert in_child(lambda: main(train_argv(fault_shards, reference, 4, "--resume"))) == 0
    counted = tmp_path / "counted"
    shutil.copytree(base, counted, symlinks=True)
    ops = count_ops(counted / "checkpoints",
                    lambda _: main(train_argv(fault_shards, counted, 4, "--resume")))  # fmt: skip
    renames = [k for k, (name, _) in enumerate(ops, 1) if name in ("replace", "rename")]
    assert renames
    for k in renames if every else renames[:1]:
        run = tmp_path / f"after-{k}"
        shutil.copytree(base, run, symlinks=True)
        argv = train_argv(fault_shards, run, 4, "--resume")
        _kill_then_resume(fault_shards, run, k, "after", argv, argv)
        assert_same_weights(weights_of(run), weights_of(reference))


# ----------------------------------------------------------------------------- 3. resume
def _copy(run: Path, to: Path) -> Path:
    return Path(shutil.copytree(run, to, symlinks=True))


def test_resume_never_starts_over_on_a_folder_holding_weights(
    fault_shards: Path, fault_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    run = _copy(fault_run, tmp_path / "run")
    for state in run.rglob("*state.pt"):
        state.unlink()
    weights = {k: v for k, v in snapshot(run).items() if k.endswith(".safetensors")}
    code, err = cf(train_argv(fault_shards, run, 4, "--resume"), capsys)
    line = error_line(err)
    assert code == 1 and str(run) in line and "--restart" in line
    assert {k: v for k, v in snapshot(run).items() if k.endswith(".safetensors")} == weights

    wrong = train_argv(fault_shards, run, 3, "--restart")
    wrong[wrong.index("classification")] = "detection"  # fails on the data, before step 1
    code, err = cf(wrong, capsys)
    assert code == 1 and (run / "checkpoints" / "step-000002").is_dir()  # nothing deleted yet
    code, err = cf(train_argv(fault_shards, run, 3, "--restart"), capsys)
    assert code == 0, err
    assert ckpt.read_metadata(run)["step"] == 3
    assert not (run / "checkpoints" / "step-000001").exists()
    steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [3]  # the old run's log went with its checkpoints


def test_a_run_of_the_flat_layout_is_refused_not_started_over(
    fault_shards: Path, fault_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """The flat layout (last.safetensors + last.state.pt files, before step folders) was only
    ever written by unreleased code: --resume names the folder and leaves it as it was."""
    flat = tmp_path / "run" / "checkpoints"
    flat.mkdir(parents=True)
    newest = fault_run / "checkpoints" / "step-000002"
    shutil.copy(newest / "model.safetensors", flat / "last.safetensors")
    shutil.copy(newest / "state.pt", flat / "last.state.pt")
    before = snapshot(flat.parent)
    code, err = cf(train_argv(fault_shards, flat.parent, 3, "--resume"), capsys)
    line = error_line(err)
    assert code == 1 and f"{flat}: weights without a complete step-* checkpoint" in line, err
    assert "--restart" in line and snapshot(flat.parent) == before


@pytest.mark.parametrize(("flag", "value", "before"), [
    ("--image-size", "64", "32"),
    ("--model", "clusterformer-tiny", "clusterformer-nano"),
])  # fmt: skip
def test_resume_with_another_setup_names_both_values(
    fault_shards: Path, fault_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
    flag: str, value: str, before: str,
) -> None:  # fmt: skip
    run = _copy(fault_run, tmp_path / "run")
    argv = train_argv(fault_shards, run, 4, "--resume")
    if flag in argv:
        argv[argv.index(flag) + 1] = value
    else:
        argv += [flag, value]
    code, err = cf(argv, capsys)
    line = error_line(err)
    assert code == 1 and f"{flag} {before}" in line and value in line, line
    assert ckpt.read_metadata(run)["step"] == 2


def test_resume_with_another_task_names_both_values(fault_run: Path) -> None:
    from clusterformer.engine import run_folder

    found = run_folder.resumable(fault_run, resume=True, restart=False, notes=[])
    with pytest.raises(run_folder.RunFolderError, match="--task classification, now detection"):
        run_folder.check_same_setup(found, task="detection", model="clusterformer-nano",
                                    image_size=32, num_classes=4)  # fmt: skip


# ----------------------------------------------------------------------------- 6. divergence
def _poison(how: str) -> object:
    from clusterformer.engine import trainer

    real = trainer.train_step

    def poisoned(state, task, group, **kwargs):  # noqa: ANN001, ANN202
        scalars = real(state, task, group, **kwargs)
        if state.step == 3:  # the update of step 3 blows the weights up
            with torch.no_grad():
                for p in state.module.parameters():
                    p.fill_(float("nan")) if how == "nan" else p.mul_(1e30)
        return scalars

    return poisoned


@pytest.mark.parametrize("how", ["nan", "exploded"])
def test_a_diverging_run_keeps_the_last_good_checkpoint(
    fault_shards: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
    monkeypatch: pytest.MonkeyPatch, how: str,
) -> None:  # fmt: skip
    """NaN weights, or finite ones so large the outputs overflow: the save of step 3 is refused
    with one line, and ``last`` stays the step-2 checkpoint."""
    from clusterformer.engine import trainer

    monkeypatch.setattr(trainer, "train_step", _poison(how))
    run = tmp_path / "run"
    code, err = cf(train_argv(fault_shards, run, 5, "--save-every", "1"), capsys)
    line = error_line(err)
    assert code == 1 and "step 3" in line and "step-000002" in line and "--lr" in line, line
    assert ckpt.read_metadata(run)["step"] == 2
    assert all(torch.isfinite(t).all() for t in weights_of(run).values())
    assert dotfiles(run) == []


def test_the_issues_exploding_lr_run_saves_nothing(
    fault_shards: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    run = tmp_path / "run"
    code, err = cf(train_argv(fault_shards, run, 4, "--save-every", "1") + ["--lr", "1e6"], capsys)
    assert code == 1 and str(run) in error_line(err)
    code, err = cf(["eval", "--ckpt", run, "--data", fault_shards], capsys)
    assert code == 1 and "no checkpoints/last.safetensors" in error_line(err)


def _diverged_copy(fault_run: Path, to: Path, how: str) -> Path:
    source = ckpt.resolve_checkpoint(fault_run)
    tensors = load_file(str(source))
    with torch.no_grad():
        for name, t in tensors.items():
            if t.is_floating_point():
                tensors[name] = torch.full_like(t, float("nan")) if how == "nan" else t * 1e30
    from safetensors import safe_open

    with safe_open(str(source), framework="pt") as f:
        meta = f.metadata()
    save_file(tensors, str(to), metadata=meta)
    return to


@pytest.mark.parametrize("how", ["nan", "exploded"])
def test_eval_and_predict_refuse_diverged_weights(
    fault_shards: Path, fault_raw: Path, fault_run: Path, tmp_path: Path,
    capsys: pytest.CaptureFixture, how: str,
) -> None:  # fmt: skip
    bad = _diverged_copy(fault_run, tmp_path / "diverged.safetensors", how)
    code, err = cf(["eval", "--ckpt", bad, "--data", fault_shards, "--out", tmp_path / "m.json"],
                   capsys)  # fmt: skip
    assert code == 1 and str(bad) in error_line(err)
    assert not (tmp_path / "m.json").exists()
    out = tmp_path / "pred"
    folder = fault_raw / "classes" / "circle"
    code, err = cf(["predict", "--ckpt", bad, folder, "--out", out], capsys)
    assert code == 1 and str(bad) in error_line(err)
    assert not out.exists() or list(out.iterdir()) == []


def test_json_written_never_holds_nan(
    fault_shards: Path, fault_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    import clusterformer.engine.evaluate as evaluate_module

    nan_metrics = {"top1": float("nan"), "top5": float("inf")}
    monkeypatch.setattr(evaluate_module, "evaluate", lambda *a, **k: nan_metrics)
    out = tmp_path / "m.json"
    code, err = cf(["eval", "--ckpt", fault_run, "--data", fault_shards, "--out", out], capsys)
    assert code == 0, err
    metrics = strict_json(tmp_path / "m.json")
    assert metrics["top1"] is None and metrics["top5"] is None and metrics["step"] == 2


# ----------------------------------------------------------------------------- 10. leftovers
def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_temporaries_of_dead_writers_are_removed_on_the_next_start(
    fault_shards: Path, fault_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    run = _copy(fault_run, tmp_path / "run")
    ckpt_dir = run / "checkpoints"
    host = socket.gethostname().replace("-", "_")  # temporaries are tagged <host>-<pid>
    leftovers = [ckpt_dir / f".step-000003.tmp-{host}-{_dead_pid()}",
                 run / f".config.json.a8b2.tmp-{host}-{_dead_pid()}"]  # fmt: skip
    leftovers[0].mkdir()
    (leftovers[0] / "model.safetensors").write_bytes(b"\0" * 1000)
    leftovers[1].write_text("{")
    alive = ckpt_dir / f".step-000009.tmp-{host}-{os.getppid()}"
    alive.mkdir()  # a live writer's (this test's parent process): left alone
    code, err = cf(train_argv(fault_shards, run, 3, "--resume", "--save-every", "1"), capsys)
    assert code == 0, err
    assert not any(p.exists() for p in leftovers) and alive.exists()
    assert "removed 2 temporary" in err


def test_a_failed_predict_writes_nothing(
    fault_raw: Path, fault_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    good = fault_raw / "classes" / "circle" / "000000.jpg"
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not a jpeg")
    out = tmp_path / "pred"
    code, err = cf(["predict", "--ckpt", fault_run, good, bad, "--out", out], capsys)
    line = error_line(err)
    assert code == 1 and str(bad) in line and "BytesIO" not in line, line
    assert not out.exists() or list(out.iterdir()) == []


# ----------------------------------------------------------------------------- 11. waits
def test_waits_outlast_a_slow_machine(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """On a loaded machine a checkpoint may take minutes: the wait must not give up while the
    process is alive (here a fake clock runs 30 s per poll; the file appears after 10 min)."""
    import waiting

    clock = [0.0]
    target = tmp_path / "step-000002"

    def sleep(seconds: float) -> None:
        clock[0] += 30.0
        if clock[0] >= 600:
            target.mkdir(exist_ok=True)

    monkeypatch.setattr(waiting.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(waiting.time, "sleep", sleep)

    class Alive:
        stderr = None
        returncode = None

        def poll(self) -> None:
            return None

    waiting.wait_for_path(target, Alive())
    assert target.exists() and clock[0] == 600


def test_no_test_waits_against_a_short_clock() -> None:
    """Every wait in the suite is a safety net of at least 5 minutes."""
    short = []
    for path in sorted(Path(__file__).parent.glob("*.py")):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            for value in re.findall(r"\btimeout\s*[=:]\s*(?:float\s*=\s*)?([0-9][0-9.]*)", line):
                if float(value) < 300:
                    short.append(f"{path.name}:{number}: {line.strip()}")
    assert short == []
