"""Metric tables for the terminal: values with their unit, small values with two significant
digits (AP 0.0011 never shows as 0.00), counts as integers, per-class rows.

Every ``cf`` metric that is a rate is in percent (0-100); the count keys below are not.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

# Keys that count things (never percent); ``num_*`` are counts too.
COUNT_KEYS = frozenset({"step", "unmatched_predictions"})
UNITS = {"image_size": "px"}


def is_count(key: str) -> bool:
    return key.startswith("num_") or key in COUNT_KEYS


def unit_of(key: str, value: Any) -> str:
    """``%`` for rates, ``px`` for sizes, nothing for counts and text."""
    if key in UNITS:
        return UNITS[key]
    if is_count(key) or isinstance(value, bool) or not isinstance(value, int | float):
        return ""
    return "%"


def format_value(key: str, value: Any) -> str:
    """One metric as text: counts as integers; rates with 2 decimals, or 2 significant digits
    when smaller than 0.1 (``0.0011``); ``-1`` (no ground truth) as ``n/a``; ``None`` as ``-``."""
    if value is None:
        return "-"
    if isinstance(value, bool) or not isinstance(value, int | float):
        return str(value)
    if is_count(key) or key in UNITS:
        return str(int(round(value)))
    if not math.isfinite(value):
        return str(value)
    if value == -1:
        return "n/a"
    if value == 0 or abs(value) >= 0.1:
        return f"{value:.2f}"
    decimals = 1 - math.floor(math.log10(abs(value)))  # two significant digits
    return f"{value:.{decimals}f}"


def _note(values: list[Any], unit: str) -> str:
    note = f"rates in percent (0-100){unit}"
    return note + ("; n/a: no ground truth" if any(v == -1 for v in values) else "")


def summary_table(metrics: Mapping[str, Any], num_classes: int | None = None) -> Any:
    """A rich renderable: a table of metric, value, unit and a line saying rates are percent
    (printed under the table, not as its caption, so it never wraps to the table's width).
    ``num_classes``: a classifier's class count; top-k rows for k >= it are left out, and the
    note says so."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    from clusterformer.metrics.topk import trivial_top_k  # torch: not at cf's import

    table = Table()
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_column("unit")
    left_out = trivial_top_k(metrics, num_classes)
    shown = {k: v for k, v in metrics.items() if k not in left_out}
    for key, value in shown.items():
        table.add_row(key, format_value(key, value), unit_of(key, value))
    note = _note(list(shown.values()), "")
    if left_out:
        note += (f"; {', '.join(left_out)} not shown: with {num_classes} classes every image's "
                 "class is among them")  # fmt: skip
    return Group(table, Text(note))


def is_empty(row: Mapping[str, Any]) -> bool:
    """A per-class row with nothing to score: every value n/a (``-1``) or missing."""
    return all(v is None or (isinstance(v, int | float) and v == -1) for v in row.values())


def per_class_table(per_class: Mapping[str, Mapping[str, Any]], show_empty: bool = False) -> Any:
    """A rich renderable: one row per class, one column per metric (percent), and its note.
    Classes with nothing to score (:func:`is_empty`) are left out unless ``show_empty``: at 150
    classes they bury the rest; the note says how many."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    hidden = 0 if show_empty else sum(1 for row in per_class.values() if is_empty(row))
    if hidden:
        per_class = {name: row for name, row in per_class.items() if not is_empty(row)}

    columns: list[str] = []
    for row in per_class.values():
        columns += [m for m in row if m not in columns]
    table = Table(title="per class")
    table.add_column("class")
    for column in columns:
        table.add_column(f"{column} %", justify="right")
    for name, row in per_class.items():
        table.add_row(name, *(format_value(c, row.get(c)) for c in columns))
    values = [v for row in per_class.values() for v in row.values()]
    note = _note(values, ", by class")
    if hidden:
        note += (f"; {hidden} class(es) with nothing to score (no ground truth, no prediction) "
                 "not shown: --show-empty lists them")  # fmt: skip
    return Group(table, Text(note))
