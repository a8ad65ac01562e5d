"""Names that come from data, and the paths built from them.

A dataset decides the names of files that ``cf`` writes (``cf eval`` writes each semantic and
panoptic prediction as ``<sample key>.png``) and reads (a COCO ``file_name``, a prediction
JSON's PNG name). A crafted shard or annotation file could name ``../../x`` or ``/abs/x`` and so
reach any file the user can write. One rule covers every such name, and every path built from
one is checked again after joining:

* :func:`name_problem` / :func:`check_name`: a name from data is a non-empty *relative* name:
  no ``/`` or ``\\`` at the start, no ``..`` or ``.`` part, no empty part, no NUL or other
  control character, at most :data:`MAX_NAME` characters. Parts separated by ``/`` are allowed
  (COCO's ``train2017/0001.jpg``, a webdataset key ``dir/0001``). A name that breaks the rule
  is refused, never rewritten: a rewritten name could collide with another sample's.
* :func:`join_inside`: ``folder / name`` for a name that passes, checked to lie inside
  ``folder`` once symbolic links are resolved (a link inside the folder cannot lead out).
"""

from __future__ import annotations

import os
from pathlib import Path

# Longer names are no dataset's: file systems stop at 255 bytes per part, 4096 per path.
MAX_NAME = 1024


class UnsafeNameError(ValueError):
    """A name from data that would lead a path out of its folder (or is not a name at all)."""


def name_problem(name: object) -> str | None:
    """Why ``name`` cannot name a file inside a folder, or None when it can."""
    if not isinstance(name, str):
        return f"is a {type(name).__name__}, not a string"
    if not name:
        return "is empty"
    if len(name) > MAX_NAME:
        return f"is {len(name)} characters long (at most {MAX_NAME})"
    bad = next((c for c in name if ord(c) < 32 or ord(c) == 127), None)
    if bad is not None:
        return f"holds the control character {bad!r}"
    if "\\" in name:
        return "holds a backslash (a Windows path separator)"
    if name.startswith("/"):
        return "is an absolute path"
    if len(name) > 1 and name[1] == ":" and name[0].isalpha():
        return "starts with a drive letter"
    parts = name.split("/")
    if any(part in ("..", ".") for part in parts):
        return "has a '..' or '.' part"
    if any(not part for part in parts):
        return "has an empty part ('//' or a trailing '/')"
    return None


def check_name(name: object, what: str = "name") -> str:
    """``name`` when it passes the rule (module docstring); else UnsafeNameError saying why,
    with ``what`` naming where it came from (e.g. ``"shard.tar: sample key"``)."""
    problem = name_problem(name)
    if problem is not None:
        raise UnsafeNameError(f"{what} {str(name)[:80]!r} {problem}; names from data must be "
                              "relative names inside their folder")  # fmt: skip
    return name  # type: ignore[return-value]


def is_inside(folder: str | os.PathLike, path: str | os.PathLike) -> bool:
    """Whether ``path`` lies inside ``folder`` (or is it) once both are resolved."""
    root = Path(folder).resolve()
    return Path(path).resolve() == root or root in Path(path).resolve().parents


def join_inside(folder: str | os.PathLike, name: str, what: str = "name") -> Path:
    """``folder / name`` for a ``name`` from data; UnsafeNameError when the name breaks the rule
    or the joined path resolves outside ``folder``."""
    path = Path(folder) / check_name(name, what)
    if not is_inside(folder, path):
        raise UnsafeNameError(f"{what} {name[:80]!r} leads out of {folder} (through a symbolic "
                              "link); names from data must stay inside their folder")  # fmt: skip
    return path
