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


def summary_table(metrics: Mapping[str, Any]) -> Any:
    """A rich renderable: a table of metric, value, unit and a line saying rates are percent
    (printed under the table, not as its caption, so it never wraps to the table's width)."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    table = Table()
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_column("unit")
    for key, value in metrics.items():
        table.add_row(key, format_value(key, value), unit_of(key, value))
    return Group(table, Text(_note(list(metrics.values()), "")))


def per_class_table(per_class: Mapping[str, Mapping[str, Any]]) -> Any:
    """A rich renderable: one row per class, one column per metric (percent), and its note."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

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
    return Group(table, Text(_note(values, ", by class")))
