"""``cf predict --on-error stop|skip`` (issue 24, point 5) and its ``--task`` answer (point 8):
one unreadable image no longer costs the whole folder, and the default still stops cleanly.

Each test fails on the code before the issue: it had no ``--on-error`` (exit 2), left the
output folder it made behind when a bad image stopped it, and answered ``--task`` with
"No such option"."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from cli_runner import run_cf
from fault_kit import error_line
from PIL import Image

LEGACY_CKPT = Path(__file__).parent / "fixtures" / "legacy" / "classification.safetensors"


def _cf(args: list[object], capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    code = run_cf([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """Three photos and, sorted between them, a file that is not an image."""
    root = tmp_path / "in"
    root.mkdir()
    rng = np.random.default_rng(0)
    for name in ("a", "c", "d"):
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(root / f"{name}.jpg")
    (root / "b.jpg").write_bytes(b"this is not a jpeg")
    return root


def test_skip_predicts_the_rest_and_names_the_bad_file(
    folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "out"
    code, stdout, err = _cf(["predict", "--ckpt", LEGACY_CKPT, folder, "--out", out,
                             "--on-error", "skip", "--batch-size", "2"], capsys)  # fmt: skip
    assert code == 0, err
    records = json.loads((out / "predictions.json").read_text())
    assert [Path(r["image"]).name for r in records] == ["a.jpg", "c.jpg", "d.jpg"]
    assert sorted(p.name for p in out.iterdir()) == [
        "a.json", "a.png", "c.json", "c.png", "d.json", "d.png", "predictions.json"]
    named = [line for line in err.splitlines() if str(folder / "b.jpg") in line]
    assert len(named) == 1 and "skipped" in named[0] and "cannot decode" in named[0], err
    assert "skipped 1 of 4 input(s)" in err.splitlines()[-1], err
    assert "wrote 3 overlay(s)" in stdout


def test_stop_names_the_file_and_leaves_nothing(
    folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "new" / "out"
    code, _, err = _cf(["predict", "--ckpt", LEGACY_CKPT, folder, "--out", out], capsys)
    assert code == 1
    assert str(folder / "b.jpg") in error_line(err)
    assert not out.exists()  # not even the folder the run made
    existing = tmp_path / "existing"
    (existing / "keep").mkdir(parents=True)
    code, _, err = _cf(["predict", "--ckpt", LEGACY_CKPT, folder, "--out", existing,
                        "--on-error", "stop"], capsys)  # fmt: skip
    assert code == 1 and [p.name for p in existing.iterdir()] == ["keep"], err


def test_skip_with_nothing_readable_exits_1_and_writes_nothing(
    folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "out"
    code, _, err = _cf(["predict", "--ckpt", LEGACY_CKPT, folder / "b.jpg", "--out", out,
                        "--on-error", "skip"], capsys)  # fmt: skip
    assert code == 1 and "none of the 1 input(s) could be read" in error_line(err)
    assert not out.exists()


def test_skip_leaves_out_a_video_that_does_not_decode(
    folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    pytest.importorskip("av")
    video = tmp_path / "clip.mp4"
    video.write_bytes(b"not a video either")
    out = tmp_path / "out"
    code, _, err = _cf(["predict", "--ckpt", LEGACY_CKPT, folder / "a.jpg", video,
                        folder / "c.jpg", "--out", out, "--on-error", "skip"], capsys)  # fmt: skip
    assert code == 0, err
    records = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert [Path(r["image"]).name for r in records] == ["a.jpg", "c.jpg"]
    assert any(str(video) in line and "skipped" in line for line in err.splitlines()), err
    assert "skipped 1 of 3 input(s)" in err


@pytest.mark.parametrize("argv", [["--on-error", "ignore"], ["--task", "detection"]])
def test_usage_errors_are_one_line_exit_2(
    folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture, argv: list[str]
) -> None:
    code, _, err = _cf(["predict", "--ckpt", LEGACY_CKPT, folder / "a.jpg", "--out",
                        tmp_path / "out", *argv], capsys)  # fmt: skip
    line = error_line(err)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    if argv[0] == "--task":
        assert "--task detection" in line and "from the checkpoint" in line, line
    else:
        assert "ignore" in line and "skip" in line, line
    assert not (tmp_path / "out").exists()


def test_the_library_skips_the_same_way_one_entry_per_input(folder: Path) -> None:
    import clusterformer
    from clusterformer.data.errors import ImageDecodeError

    predictor = clusterformer.load(LEGACY_CKPT, device="cpu")
    inputs = [folder / "a.jpg", folder / "b.jpg", folder / "gone.jpg", folder / "c.jpg"]
    with pytest.warns(UserWarning) as caught:
        preds = predictor(inputs, on_error="skip", batch_size=2)
    assert [None if p is None else Path(p.image).name for p in preds] == ["a.jpg", None, None, "c.jpg"]
    said = [str(w.message) for w in caught]
    assert any("b.jpg" in m and "cannot decode" in m for m in said), said
    assert any("gone.jpg" in m for m in said), said
    alone = predictor([folder / "a.jpg", folder / "c.jpg"])
    assert [p.to_dict() for p in alone] == [preds[0].to_dict(), preds[3].to_dict()]
    with pytest.raises(ImageDecodeError, match="b.jpg"):
        predictor(inputs[:2])  # the default still raises
    with pytest.raises(ValueError, match="on_error"):
        predictor(inputs[:1], on_error="ignore")
