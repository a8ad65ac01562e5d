"""``cf eval`` stays readable at many classes (issue 24, point 6): per-class tables leave out the
classes with nothing to score unless asked, the confusion matrix carries class names at 150
classes at a sane size with the most confused pairs beside it, the bar chart's mean is written
as the tables write numbers, and the files ``cf eval`` writes are listed and world-readable.

Each test fails on the code before the issue: every n/a class was printed (and --show-empty
did not exist), the matrix dropped names above 60 classes at 3657x3990 px, the legend said
"mean 0.0" for 0.0043, the prediction PNGs were mode 0600 and not listed."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import numpy as np
import pytest
from cli_runner import run_cf
from PIL import Image

from clusterformer.cli import plots


def _cf(args: list[object], capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    code = run_cf([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# ----------------------------------------------------------------------------- per-class table
def test_per_class_table_hides_classes_with_nothing_to_score(
    collapsed_semantic: dict, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    argv = ["eval", "--ckpt", collapsed_semantic["collapsed"], "--data",
            collapsed_semantic["shards"], "--per-class", "--out", tmp_path / "m.json"]  # fmt: skip
    code, out, err = _cf(argv, capsys)
    assert code == 0, err
    per_class = json.loads((tmp_path / "m.json").read_text())["per_class"]
    empty = [name for name, row in per_class.items() if all(v == -1 for v in row.values())]
    assert {"unused-a", "unused-b"} <= set(empty)  # the JSON keeps every class
    assert "unused-a" not in out and "unused-b" not in out
    assert f"{len(empty)} class(es) with nothing to score" in out and "--show-empty" in out
    assert "sky" in out  # a class with something to score stays
    code, out, err = _cf([*argv[:-2], "--out", tmp_path / "all.json", "--show-empty"], capsys)
    assert code == 0, err
    assert "unused-a" in out and "unused-b" in out and "nothing to score" not in out


# ----------------------------------------------------------------------------- written files
def test_eval_lists_what_it_writes_with_normal_permissions(
    collapsed_semantic: dict, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    pytest.importorskip("matplotlib")
    metrics = tmp_path / "eval" / "m.json"
    code, out, err = _cf(["eval", "--ckpt", collapsed_semantic["collapsed"], "--data",
                          collapsed_semantic["shards"], "--out", metrics, "--plots"], capsys)  # fmt: skip
    assert code == 0, err
    folder = tmp_path / "eval" / "m.semantic"
    pngs = sorted(folder.glob("*.png"))
    assert len(pngs) == 4
    assert f"wrote {metrics}" in out
    assert f"wrote 4 prediction PNG(s) to {folder}/" in out
    assert "m.confusion_matrix.png" in out and "m.confused_pairs.png" in out
    expected = 0o666 & ~_umask()
    for path in [metrics, *pngs, *(tmp_path / "eval").glob("*.png")]:
        assert stat.S_IMODE(path.stat().st_mode) == expected, path


# ----------------------------------------------------------------------------- figures
class _Evaluator:
    """What ``write_eval_plots`` reads of an evaluator: a confusion matrix with names."""

    def __init__(self, matrix: np.ndarray, names: list[str]) -> None:
        self.matrix, self.names = matrix, names

    def confusion_matrix(self) -> tuple[np.ndarray, list[str]]:
        return self.matrix, self.names


@pytest.fixture
def figures(monkeypatch: pytest.MonkeyPatch) -> dict:
    """The matplotlib figure of every PNG written, by file name."""
    seen: dict = {}
    save = plots._save

    def keep(fig, path):  # noqa: ANN001, ANN202
        seen[path.name] = fig
        return save(fig, path)

    monkeypatch.setattr(plots, "_save", keep)
    return seen


def test_a_150_class_matrix_has_names_a_sane_size_and_its_top_pairs(
    tmp_path: Path, figures: dict
) -> None:
    pytest.importorskip("matplotlib")
    rng = np.random.default_rng(0)
    counts = rng.integers(0, 20, (150, 150)) + np.diag(np.full(150, 500))
    counts[7, 42] = 400  # the most confused pair by far
    names = [f"ade class {i:03d}" for i in range(150)]
    written = plots.write_eval_plots(tmp_path, "", {}, _Evaluator(counts, names))
    assert [p.name for p in written] == ["confusion_matrix.png", "confused_pairs.png"]
    width, height = Image.open(tmp_path / "confusion_matrix.png").size
    assert 1200 < width < 2600 and 1200 < height < 2600, (width, height)
    ax = figures["confusion_matrix.png"].axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == names
    assert [t.get_text() for t in ax.get_xticklabels()] == names
    pairs = figures["confused_pairs.png"].axes[0]
    labels = [t.get_text() for t in pairs.get_yticklabels()]
    assert len(labels) == plots.TOP_PAIRS and labels[0] == "ade class 007 \u2192 ade class 042"


def test_confused_pairs_rank_off_diagonal_counts() -> None:
    matrix = np.array([[5, 3, 0], [1, 9, 0], [0, 6, 2]])
    assert plots.confused_pairs(matrix, ["a", "b", "c"]) == [
        ("c", "b", 6, 75.0), ("a", "b", 3, 37.5), ("b", "a", 1, 10.0)]
    assert plots.confused_pairs(np.eye(3), ["a", "b", "c"]) == []


def test_the_bar_chart_mean_is_written_as_the_table_writes_it(
    tmp_path: Path, figures: dict
) -> None:
    pytest.importorskip("matplotlib")
    plots.draw_per_class("IoU", {"wall": 0.0086, "sky": 0.0}, tmp_path / "bars.png")
    legend = figures["bars.png"].axes[0].get_legend()
    assert [t.get_text() for t in legend.get_texts()] == ["mean 0.0043"]
