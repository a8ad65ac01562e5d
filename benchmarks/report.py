"""The benchmarks' common ending: a Markdown table of result rows, and the rows as JSON."""

from __future__ import annotations

import json
from typing import Any


def print_report(rows: list[dict[str, Any]], columns: dict[str, str], json_out: str | None) -> None:
    """Print ``rows`` as a Markdown table (``columns``: header -> row key; numbers right-aligned,
    ``None`` as "-") and write them to ``json_out`` when given."""
    first = rows[0] if rows else {}
    align = ["---:" if isinstance(first.get(key), int | float) else "---" for key in columns.values()]
    print("| " + " | ".join(columns) + " |")
    print("|" + "|".join(align) + "|")
    for row in rows:
        print("| " + " | ".join("-" if row[key] is None else str(row[key]) for key in columns.values()) + " |")
    if json_out:
        with open(json_out, "w") as handle:
            json.dump(rows, handle, indent=2)
