"""Keeping a Table S1 experiment: the records of finished runs copied to and from a committed
archive (``table_s1.py --archive``), and the hash of the code an OUT was trained with
(``code.json``). A run's folder and settings are ``table_s1.py``'s; this file only copies and
checks them."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any


def write_json(path: Path, data: Any) -> None:
    """Whole or nothing: a run killed mid-write must not leave a result that looks finished."""
    partial = path.with_suffix(".partial")
    partial.write_text(json.dumps(data, indent=1))
    os.replace(partial, path)


# What of a run folder is its record: small, and enough for the report and for check_same_spec.
RECORD_FILES = ("spec.json", "config.json", "metrics.jsonl", "result.json")


def copy_record(source: Path, target: Path) -> None:
    """A finished run's records from one run folder to another, ``result.json`` last and whole:
    a folder with a ``result.json`` is finished."""
    target.mkdir(parents=True, exist_ok=True)
    for name in RECORD_FILES[:-1]:
        if (source / name).exists():
            shutil.copyfile(source / name, target / name)
    write_json(target / "result.json", json.loads((source / "result.json").read_text()))


def copy_finished(source: Path, target: Path) -> list[str]:
    """Copy into ``target`` every finished run of ``source`` that ``target`` does not hold;
    returns their names. Both ways: OUT to the archive (what finished), the archive to OUT (a
    fresh machine, a new OUT: the loop then checks their settings like any finished run's)."""
    copied = []
    if (source / "cost.json").exists() and not (target / "cost.json").exists():
        target.mkdir(parents=True, exist_ok=True)  # table_s1_cost.py's side-by-side timings
        shutil.copyfile(source / "cost.json", target / "cost.json")
    for result in sorted(source.glob("runs/*/result.json")):
        folder = target / "runs" / result.parent.name
        if not (folder / "result.json").exists():
            copy_record(result.parent, folder)
            copied.append(folder.name)
    return copied


def code_fingerprint() -> str:
    """sha256 of the ``clusterformer`` sources this interpreter (and so every child) imports:
    the package and its ``cli`` and ``data`` subpackages, wherever an install put them (an
    editable checkout keeps ``cli/`` and ``data/`` beside the package, a wheel inside it)."""
    import hashlib
    import importlib.util

    digest = hashlib.sha256()
    for name in ("clusterformer", "clusterformer.cli", "clusterformer.data"):
        root = Path(next(iter(importlib.util.find_spec(name).submodule_search_locations)))
        for path in sorted(root.rglob("*.py")):
            relative = path.relative_to(root)
            if name == "clusterformer" and relative.parts[0] in ("cli", "data"):
                continue  # counted under its own name (a wheel nests them)
            digest.update(f"{name}/{relative.as_posix()}\0".encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


def check_same_code(folder: Path, fingerprint: str) -> None:
    """An OUT (and an archive) is one experiment on one code: a later commit could change the
    model or its initial weights halfway through the table (as 755081a did). The first command
    writes ``code.json``; every later one must import the same sources. To go on after main has
    moved, install the experiment's commit in a venv of its own and run this script with that
    venv's python (the children import the package of the interpreter that runs the harness)."""
    path = folder / "code.json"
    if path.exists():
        written = json.loads(path.read_text())
        if written["sha256"] != fingerprint:
            raise SystemExit(f"error: {folder}: its runs were trained by other clusterformer "
                             f"sources (code.json: {written.get('version')}, "
                             f"{written['sha256'][:12]}; this python imports "
                             f"{fingerprint[:12]}); use the venv of that code, or another --out")
        return
    from clusterformer import __version__

    folder.mkdir(parents=True, exist_ok=True)
    write_json(path, {"sha256": fingerprint, "version": __version__})
