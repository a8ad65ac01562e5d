"""Run the `cf` command line in-process, as tests need it: the exit code instead of SystemExit."""

from __future__ import annotations

import os

from clusterformer.cli.app import main


def run_cf(args: list[str]) -> int:
    """``cf ARGS`` through the real entry point (one-line errors included); returns its exit code."""
    try:
        main(["--debug", *args] if os.environ.get("CF_TEST_DEBUG") else args)
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0
