"""PNG figures from plain data: training curves, a confusion matrix, per-class bar charts.

Every function takes numbers (lists, numpy arrays, ``{class name: value}`` dicts) and a path,
and draws with matplotlib's object API on the Agg canvas (no pyplot state, no display).
matplotlib is the ``plot`` extra: :func:`require_matplotlib` names it when it is missing.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from clusterformer.cli.metric_table import format_value
from clusterformer.extras import require

# A run's curves: panel name -> (steps, values).
Curves = dict[str, tuple[list[int], list[float]]]

DPI = 100
MAX_INCHES = 40  # ~4000 px: the per-class bar charts of ADE's 150 classes get a row each
ANNOTATE_UP_TO = 20  # classes: write the percentage in each cell of the confusion matrix
# A confusion matrix cell: 0.3 in, shrunk for many classes so that the matrix stays within
# MATRIX_INCHES (150 classes: 0.12 in, about 2000 px in all with the names), never below
# MIN_CELL_INCHES; class names are written on both axes at every size, in a font that fits
# the cell (6.5 pt at 150 classes), cut to NAME_CHARS characters.
MATRIX_INCHES = 18
MIN_CELL_INCHES = 0.08
NAME_CHARS = 24
TOP_PAIRS = 20  # the confused pairs drawn beside the full matrix (confused_pairs.png)


def require_matplotlib(needed_by: str) -> None:
    require("matplotlib", "plot", needed_by)


def _figure(width: float, height: float) -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=(min(width, MAX_INCHES), min(height, MAX_INCHES)), dpi=DPI)


def _save(fig: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", bbox_inches="tight")
    return path


def _draw_panel(ax: Any, panel: str, runs: Mapping[str, Curves]) -> None:
    for label, curves in runs.items():
        if panel in curves:
            steps, values = curves[panel]
            ax.plot(steps, values, marker="o" if len(steps) < 20 else None, markersize=3,
                    label=label)  # fmt: skip
    ax.set_title(panel)
    ax.set_xlabel("step")
    ax.grid(True, alpha=0.3)
    if len(runs) > 1:
        ax.legend(fontsize="small")


def draw_curves(runs: Mapping[str, Curves], panels: Sequence[str], path: Path) -> Path:
    """One PNG with a panel per name in ``panels``, every run's curve overlaid (a legend names
    the runs when there are several)."""
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig = _figure(5 * cols, 3.5 * rows)
    for index, panel in enumerate(panels):
        _draw_panel(fig.add_subplot(rows, cols, index + 1), panel, runs)
    fig.tight_layout()
    return _save(fig, path)


def draw_curve(runs: Mapping[str, Curves], panel: str, path: Path) -> Path:
    """One panel in its own PNG."""
    fig = _figure(6, 4)
    _draw_panel(fig.add_subplot(1, 1, 1), panel, runs)
    fig.tight_layout()
    return _save(fig, path)


def _row_percent(counts: np.ndarray) -> np.ndarray:
    """Each row of a count matrix in percent of its total (0 for an empty row)."""
    totals = counts.sum(1, keepdims=True)
    return np.divide(counts * 100, totals, out=np.zeros_like(counts), where=totals > 0)


def _short(name: str) -> str:
    return name if len(name) <= NAME_CHARS else name[: NAME_CHARS - 1] + "\u2026"


def draw_confusion(matrix: np.ndarray, names: Sequence[str], path: Path, title: str) -> Path:
    """A (C, C) count matrix (rows true, columns predicted), each row in percent of its total,
    the class names on both axes (cut to :data:`NAME_CHARS`), cells sized so that 150 classes
    stay about 2000 px square (:data:`MATRIX_INCHES`)."""
    counts = np.asarray(matrix, dtype=np.float64)
    percent = _row_percent(counts)
    cell = max(MIN_CELL_INCHES, min(0.3, MATRIX_INCHES / max(len(names), 1)))
    font = max(4.0, min(8.0, cell * 72 * 0.75))  # points: three quarters of the cell's height
    side = cell * len(names)
    labels = [_short(str(n)) for n in names]
    margin = 0.5 + font / 72 * 0.6 * max((len(n) for n in labels), default=1)  # the names
    fig = _figure(side + margin + 1.5, side + margin + 0.5)
    ax = fig.add_subplot(1, 1, 1)
    image = ax.imshow(percent, cmap="Blues", vmin=0, vmax=100)
    fig.colorbar(image, ax=ax, label="% of the true class", shrink=min(1.0, 6 / max(side, 1)))
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    ticks = np.arange(len(names))
    ax.set_xticks(ticks, labels=labels, rotation=90, fontsize=font)
    ax.set_yticks(ticks, labels=labels, fontsize=font)
    if len(names) <= ANNOTATE_UP_TO:
        for (row, col), value in np.ndenumerate(percent):
            if counts[row, col]:
                ax.text(col, row, f"{value:.0f}", ha="center", va="center", fontsize="x-small",
                        color="white" if value > 50 else "black")  # fmt: skip
    fig.tight_layout()
    return _save(fig, path)


def confused_pairs(matrix: np.ndarray, names: Sequence[str],
                   top: int = TOP_PAIRS) -> list[tuple[str, str, int, float]]:  # fmt: skip
    """The ``top`` largest off-diagonal cells of a (C, C) count matrix (rows true, columns
    predicted), largest first: ``(true name, predicted name, count, % of the true class)``."""
    counts = np.asarray(matrix, dtype=np.float64)
    percent = _row_percent(counts)
    off = counts.copy()
    np.fill_diagonal(off, 0)
    order = np.argsort(off, axis=None, kind="stable")[::-1][:top]
    pairs = []
    for flat in order:
        row, col = divmod(int(flat), counts.shape[1])
        if off[row, col] <= 0:
            break
        pairs.append((str(names[row]), str(names[col]), int(counts[row, col]),
                      float(percent[row, col])))  # fmt: skip
    return pairs


def draw_confused_pairs(pairs: Sequence[tuple[str, str, int, float]], path: Path) -> Path:
    """Horizontal bars of :func:`confused_pairs`: each ``true -> predicted`` pair's share of the
    true class, its count written beside; the readable companion of a large matrix."""
    fig = _figure(8, 1.5 + 0.3 * len(pairs))
    ax = fig.add_subplot(1, 1, 1)
    rows = np.arange(len(pairs))
    ax.barh(rows, [p[3] for p in pairs], color="tab:orange")
    ax.set_yticks(rows, labels=[f"{_short(t)} \u2192 {_short(p)}" for t, p, _, _ in pairs],
                  fontsize="small")  # fmt: skip
    ax.set_ylim(len(pairs) - 0.5, -0.5)  # the largest on top
    for row, (_, _, count, share) in enumerate(pairs):
        ax.text(share, row, f" {share:.1f}% ({count:,})", va="center", fontsize="x-small")
    ax.set_xlim(0, 100 * 1.25)  # room for the counts beside a bar at 100 %
    ax.set_xlabel("% of the true class predicted as the other")
    ax.set_title(f"the {len(pairs)} most confused pairs (true \u2192 predicted), by count")
    ax.grid(True, axis="x", alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)


def draw_per_class(metric: str, values: Mapping[str, float], path: Path) -> Path:
    """Horizontal bars of ``{class: value}``, best first, with the mean as a dashed line."""
    ranked = sorted(values.items(), key=lambda item: item[1], reverse=True)
    names = [name for name, _ in ranked]
    numbers = [value for _, value in ranked]
    fig = _figure(7, 1.5 + 0.25 * len(ranked))
    ax = fig.add_subplot(1, 1, 1)
    rows = np.arange(len(ranked))
    ax.barh(rows, numbers, color="tab:blue")
    ax.set_yticks(rows, labels=names, fontsize="small")
    ax.set_ylim(len(ranked) - 0.5, -0.5)  # the best class on top, no empty margin
    mean = float(np.mean(numbers))
    # The mean as the metric tables write it (0.0043, not 0.0: two significant digits).
    ax.axvline(mean, color="tab:red", linestyle="--", label=f"mean {format_value(metric, mean)}")
    ax.set_xlabel(f"{metric} (%)")
    ax.set_title(f"{metric} per class ({len(ranked)} classes)")
    ax.legend(fontsize="small", loc="lower right")
    ax.grid(True, axis="x", alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)


def _pairs(value: Any, keys: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], float]]:
    """The numbers inside nested dicts / lists of rows, each with its path of keys (a flat
    ``"IoU/<class>"`` key is two keys; a row ``{"name": "cat", "AP": 3}`` is keyed "cat").
    Keys split at their first ``/`` at the top (where ``mIoU`` sits beside ``IoU/<class>``)
    and in dicts whose every key has one, so ``{"AP": {"wall/brick": 1}}`` keeps its class."""
    if _is_number(value):
        return [(keys, float(value))]
    if isinstance(value, Mapping):
        split = not keys or all("/" in str(k) for k in value)
        return [pair for k, v in value.items()
                for pair in _pairs(v, (*keys, *(str(k).split("/", 1) if split else [str(k)])))]
    if isinstance(value, list | tuple):
        out = []
        for row in value:
            label = next((v for v in row.values() if isinstance(v, str)), None) if isinstance(
                row, Mapping) else None  # fmt: skip
            if label is not None:
                out += _pairs({k: v for k, v in row.items() if not isinstance(v, str)},
                              (*keys, label))  # fmt: skip
        return out
    return []


def per_class_groups(metrics: Mapping[str, Any]) -> dict[str, dict[str, float]]:
    """``{metric: {class: value}}`` from a metrics dict, whatever way it nests them: flat
    ``"IoU/<class>"`` keys, ``{"AP": {class: value}}``, ``{class: {"AP": value}}`` (under any
    key, e.g. ``"per_class"``) or lists of rows naming their class. Of the last two keys of each
    number, the one with fewer distinct values is the metric. A value below 0 marks a class
    with nothing to score and is left out."""
    pairs = [(path[-2], path[-1], v) for path, v in _pairs(metrics) if len(path) >= 2]
    firsts, seconds = {a for a, _, _ in pairs}, {b for _, b, _ in pairs}
    metric_first = len(firsts) <= len(seconds)
    groups: dict[str, dict[str, float]] = {}
    for a, b, value in pairs:
        metric, name = (a, b) if metric_first else (b, a)
        if math.isfinite(value) and value >= 0:
            groups.setdefault(metric, {})[name] = value
    return groups


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def file_name(text: str) -> str:
    """``text`` as a file name: letters, digits, ``-`` and ``_``."""
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in text).strip("_") or "plot"


def plots_target(plots: bool, folder: Path | None, out: Path | None) -> tuple[Path, str] | None:
    """Where ``cf eval --plots`` draws: ``(folder, file name prefix)``, None for no plots.
    ``--plots-dir`` names the folder; else beside ``--out NAME.json`` as ``NAME.<plot>.png``;
    else ``./plots/``. Checks that matplotlib is there (before a long evaluation)."""
    if not plots and folder is None:
        return None
    require_matplotlib("cf eval --plots")
    if folder is not None:
        return folder, ""
    if out is not None:
        return out.parent, f"{out.name.removesuffix('.json')}."
    return Path("plots"), ""


def write_eval_plots(folder: Path, prefix: str, metrics: Mapping[str, Any],
                     evaluator: Any = None) -> list[Path]:  # fmt: skip
    """``confusion_matrix.png`` and ``confused_pairs.png`` (when anything is confused) when the
    evaluator keeps a confusion matrix, and ``per_class_<metric>.png`` for every per-class
    metric of the evaluator or of ``metrics``, their names after ``prefix``; returns the files
    written."""
    written = []
    confusion = getattr(evaluator, "confusion_matrix", None)
    if confusion is not None:
        matrix, names = confusion()
        written.append(draw_confusion(matrix, names, folder / f"{prefix}confusion_matrix.png",
                                      f"confusion matrix ({int(matrix.sum())} counted)"))  # fmt: skip
        pairs = confused_pairs(matrix, names)
        if pairs:
            written.append(draw_confused_pairs(pairs, folder / f"{prefix}confused_pairs.png"))
    from_evaluator = getattr(evaluator, "per_class_metrics", None)
    groups = per_class_groups(from_evaluator() if from_evaluator is not None else {})
    groups.update(per_class_groups(metrics))  # read apart: each may nest its own way
    for metric, per_class in groups.items():
        if per_class:
            path = folder / f"{prefix}per_class_{file_name(metric)}.png"
            written.append(draw_per_class(metric, per_class, path))
    return written
