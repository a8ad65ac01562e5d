"""The fault matrix of issue 14, part 8: full disks and unwritable folders. Training, export,
predict and make-shapes find them before they start where they can, else fail with one line
naming the path, and leave the previous files as they were. (The other parts:
test_faults.py and test_faults_input.py.)"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from cli_runner import train_argv
from fault_kit import (
    DISKS,
    cf,
    dotfiles,
    error_line,
    mount_tmpfs,
    small_disk,
)

from clusterformer.engine import checkpoint as ckpt
from clusterformer.engine import files

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="fault injection forks")


# ----------------------------------------------------------------------------- 8. full disks
def _metrics_steps(run: Path) -> list[int]:
    log = run / "metrics.jsonl"
    return [json.loads(x)["step"] for x in log.read_text().splitlines()] if log.exists() else []


@pytest.mark.parametrize("kind", DISKS)
def test_train_finds_a_full_disk_before_step_1(
    fault_shards: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
    monkeypatch: pytest.MonkeyPatch, kind: str,
) -> None:  # fmt: skip
    with small_disk(tmp_path / "disk", "4m", kind, monkeypatch) as disk:
        code, err = cf(train_argv(fault_shards, disk / "run", 3), capsys)
        line = error_line(err)
        assert code == 1 and str(disk / "run") in line and "MiB free" in line, line
        assert _metrics_steps(disk / "run") == []  # not one step was spent
        assert dotfiles(disk) == []


@pytest.mark.parametrize("kind", DISKS)
def test_a_disk_that_fills_during_training_keeps_the_last_checkpoint(
    fault_shards: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
    monkeypatch: pytest.MonkeyPatch, kind: str,
) -> None:  # fmt: skip
    """Room for one checkpoint of nano (20 MB) but not two: the second save fails with one line
    naming the folder, and the first checkpoint stays whole and resumable."""
    with small_disk(tmp_path / "disk", "30m", kind, monkeypatch) as disk:
        run = disk / "run"
        code, err = cf(train_argv(fault_shards, run, 4, "--save-every", "1"), capsys)
        line = error_line(err)
        assert code == 1 and f"{run / 'checkpoints'}: no space left" in line, line
        assert ckpt.find_resumable(run / "checkpoints")[1]["step"] == 1
        assert dotfiles(run) == []


def test_an_unwritable_out_is_found_before_step_1(
    fault_shards: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    (tmp_path / "a-file").write_text("not a folder")
    code, err = cf(train_argv(fault_shards, tmp_path / "a-file" / "run", 3), capsys)
    assert code == 1 and str(tmp_path / "a-file") in error_line(err)
    if not mount_tmpfs(tmp_path / "ro", "1m", "ro"):
        return  # a read-only file system needs a mount
    try:
        code, err = cf(train_argv(fault_shards, tmp_path / "ro" / "run", 3), capsys)
        line = error_line(err)
        assert code == 1 and str(tmp_path / "ro") in line and "read-only" in line, line
    finally:
        subprocess.run(["umount", "-l", str(tmp_path / "ro")], capture_output=True)


@pytest.mark.parametrize("kind", DISKS)
def test_export_reports_a_full_disk_in_one_line(
    fault_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch,
    kind: str,
) -> None:  # fmt: skip
    with small_disk(tmp_path / "disk", "1m", kind, monkeypatch) as disk:
        code, err = cf(["export", "--ckpt", fault_run, "--format", "pt2", "--out", disk / "m.pt2"],
                       capsys)  # fmt: skip
        line = error_line(err)
        assert code == 1 and str(disk) in line and "free" in line, line
        assert list(disk.iterdir()) == []


def test_export_names_a_disk_that_fills_while_writing(
    fault_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past the free-space check the exporters report ENOSPC oddly (the issue saw "type Tensor
    doesn't define __round__"); a full disk is then named as such."""
    from clusterformer.export import writer

    def full(*args: object, **kwargs: object) -> None:
        monkeypatch.setattr(files, "free_bytes", lambda folder: 0)
        raise TypeError("type Tensor doesn't define __round__")

    monkeypatch.setattr(writer, "export_program", lambda *a, **k: object())
    monkeypatch.setattr(writer, "save_pt2", full)
    code, err = cf(["export", "--ckpt", fault_run, "--format", "pt2", "--out", tmp_path / "m.pt2"],
                   capsys)  # fmt: skip
    line = error_line(err)
    assert code == 1 and str(tmp_path / "m.pt2") in line and "no space left" in line, line
    assert list(tmp_path.glob("*.pt2")) == [] and dotfiles(tmp_path) == []


@pytest.mark.parametrize("workers", ["0", "2"])  # overlays written inline / on threads
@pytest.mark.parametrize("kind", DISKS)
def test_predict_onto_a_full_disk_leaves_nothing_behind(
    fault_run: Path, fault_raw: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
    monkeypatch: pytest.MonkeyPatch, kind: str, workers: str,
) -> None:  # fmt: skip
    with small_disk(tmp_path / "disk", "96k", kind, monkeypatch) as disk:
        out = disk / "pred"
        code, err = cf(["predict", "--ckpt", fault_run, fault_raw / "classes", "--out", out,
                        "--workers", workers], capsys)  # fmt: skip
        line = error_line(err)
        assert code == 1 and str(out) in line and "no space left" in line, line
        # no overlay, JSON or temporary of the failed run; the folder it made is gone too
        assert not out.exists() and list(disk.iterdir()) == [], list(disk.rglob("*"))


def test_make_shapes_onto_a_full_disk_names_the_file(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    with small_disk(tmp_path / "disk", "64k", "tmpfs", monkeypatch) as disk:
        code, err = cf(["make-shapes", disk / "s", "--num-images", "64"], capsys)
        line = error_line(err)
        assert code == 1 and str(disk / "s") in line and "no space left" in line, line
        assert dotfiles(disk) == []
