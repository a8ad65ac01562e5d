"""Progress bars for the long commands: a rich bar with count, elapsed time and ETA on stderr.

Shown only when stderr is a terminal, and never with ``cf --no-progress`` (or the environment
variable ``CF_NO_PROGRESS=1``), so logs, pipes and tests get clean output; stdout is never
touched (it carries what the commands print for machines and people to read).
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator

# Set by the root callback from ``cf --no-progress``.
DISABLED = False


def progress_enabled() -> bool:
    """Whether a live bar may be drawn: stderr is a TTY and no switch turned bars off."""
    if DISABLED or os.environ.get("CF_NO_PROGRESS", "").strip() not in ("", "0"):
        return False
    return sys.stderr.isatty()


@contextlib.contextmanager
def progress_bar(label: str, total: int | None) -> Iterator[Callable[..., None]]:
    """A bar for ``total`` units (``None``: unknown, a spinner with elapsed time); yields
    ``update(advance=1, description=None, completed=None)``, a no-op when bars are off."""
    if not progress_enabled():
        yield lambda *args, **kwargs: None
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        SpinnerColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = [SpinnerColumn(), TextColumn("{task.description}")] if total is None else [
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("eta"), TimeRemainingColumn()]  # fmt: skip
    with Progress(*columns, TimeElapsedColumn(), console=Console(stderr=True),
                  transient=True) as progress:  # fmt: skip
        bar = progress.add_task(label, total=total)

        def update(advance: int = 1, description: str | None = None,
                   completed: int | None = None) -> None:  # fmt: skip
            fields = {"description": description} if description else {}
            if completed is not None:
                progress.update(bar, completed=completed, **fields)
            else:
                progress.update(bar, advance=advance, **fields)

        yield update
