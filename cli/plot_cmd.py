"""``cf plot``: training curves of one or more runs (their ``metrics.jsonl``) as PNG."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import typer

from clusterformer.cli.errors import DataError, UserError

# Scalars of metrics.jsonl that are bookkeeping, not curves.
NOT_CURVES = frozenset({"step", "split", "epoch", "num_images", "num_samples", "image_size"})


def read_records(path: Path) -> list[dict[str, Any]]:
    """The JSON lines of a ``metrics.jsonl``; a bad line names the file and line. A last line
    without its newline is one being written (a run in progress) and is left out."""
    records = []
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                if not line.endswith("\n"):
                    break
                raise DataError(f"{path}:{number}: not a JSON line ({exc.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get("step"), int):
                raise DataError(f"{path}:{number}: expected an object with an integer 'step'")
            records.append(record)
    return records


def _value(value: Any) -> float | None:
    """A plottable number (metrics.jsonl writes NaN / inf as strings) or None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str) and value.lower() in ("nan", "inf", "-inf", "infinity", "-infinity"):
        return float(value)
    return None


def curves_of(records: Iterable[dict[str, Any]]) -> dict[str, tuple[list[int], list[float]]]:
    """Panel name -> (steps, values): training scalars by their key (``loss``, ``lr``, each
    loss term), held-out metrics as ``val/<key>``; per-class keys (``IoU/<class>``) and
    bookkeeping are left out. A resumed run's repeated steps keep the newest value."""
    by_panel: dict[str, dict[int, float]] = {}
    for record in records:
        prefix = "val/" if record.get("split") == "val" else ""
        for key, raw in record.items():
            value = _value(raw)
            if key in NOT_CURVES or "/" in key or value is None:
                continue
            by_panel.setdefault(prefix + key, {})[record["step"]] = value
    return {panel: (sorted(points), [points[s] for s in sorted(points)])
            for panel, points in by_panel.items()}  # fmt: skip


def panel_order(panels: Iterable[str]) -> list[str]:
    """``loss`` first, then the other loss terms, ``lr``, the other training scalars, then the
    held-out metrics; alphabetical within each group."""

    def rank(panel: str) -> tuple[int, str]:
        if panel.startswith("val/"):
            group = 4
        elif panel == "loss":
            group = 0
        elif "loss" in panel:
            group = 1
        elif panel == "lr":
            group = 2
        else:
            group = 3
        return group, panel

    return sorted(set(panels), key=rank)


def run_labels(runs: list[Path]) -> list[str]:
    """The legend's names: each run folder's name, its whole path where two names clash."""
    names = [run.name for run in runs]
    return [str(run) if names.count(run.name) > 1 else run.name for run in runs]


def metrics_file(run: Path) -> Path:
    path = run / "metrics.jsonl" if run.is_dir() else run
    if not path.is_file():
        raise FileNotFoundError(f"{run}: no metrics.jsonl (give a run folder of cf train or "
                                "its metrics.jsonl)")  # fmt: skip
    return path


def register(app: typer.Typer) -> None:
    @app.command("plot")
    def plot_command(
        runs: list[Path] = typer.Argument(..., help="Run folders of cf train (or their "
                                          "metrics.jsonl files); several are overlaid."),
        out: Path = typer.Option(..., "--out", help="A .png file (every curve in one figure) "
                                 "or a folder (curves.png and one PNG per curve)."),
    ) -> None:
        """Draw training curves (loss terms, lr, held-out metrics vs step) as PNG; needs the
        plot extra (matplotlib)."""
        from clusterformer.cli import plots

        plots.require_matplotlib("cf plot")
        files = [metrics_file(run) for run in runs]
        curves = {label: curves_of(read_records(path))
                  for label, path in zip(run_labels(runs), files, strict=True)}  # fmt: skip
        panels = panel_order(p for c in curves.values() for p in c)
        if not panels:
            raise DataError(f"{files[0]}: no numeric scalars to plot")
        if out.suffix.lower() == ".png":
            written = [plots.draw_curves(curves, panels, out)]
        elif out.suffix:
            raise UserError(f"--out {out}: give a .png file or a folder")
        else:
            written = [plots.draw_curves(curves, panels, out / "curves.png")]
            written += [plots.draw_curve(curves, p, out / f"{plots.file_name(p)}.png")
                        for p in panels]  # fmt: skip
        typer.echo(f"wrote {written[0]}" if len(written) == 1
                   else f"wrote {len(written)} PNGs to {out}")  # fmt: skip

