"""Durable file operations: whole-or-nothing writes, fsync, free-space checks, JSON without NaN.

Every write the engine, export and CLI make goes through here, so that

* a file appears under its final name only complete (temporary name, fsync, ``os.replace``),
  and the temporary is removed when writing fails;
* a failed write is an ``OSError`` that names the file (a bare ``write()`` failure carries no
  file name: :func:`write_bytes` adds it), which the CLI prints as one line;
* JSON never holds ``NaN``/``Infinity`` (not JSON): non-finite floats are written as ``null``.

The checkpoint writer calls the primitives below (``make_dir``, ``write_bytes``, ``fsync_dir``,
``rename``, ``symlink``, ``remove_tree``) through this module, one call per file operation, so a
test can stop the process before or after any one of them.
"""

from __future__ import annotations

import errno
import json
import math
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

_UMASK = os.umask(0o022)
os.umask(_UMASK)  # read the process umask once (os.umask can only be read by setting it)
MIB = 2**20


def _named(exc: OSError, path: Path | str) -> OSError:
    """``exc`` with ``filename`` set, so the message says which file could not be written."""
    if exc.filename is not None:
        return exc
    return type(exc)(exc.errno, exc.strerror or str(exc), str(path))


def make_dir(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise _named(exc, path) from None


def write_bytes(path: Path, data: bytes | memoryview, sync: bool = True) -> None:
    """Create ``path`` (which must not exist), write ``data``, fsync it (when ``sync``);
    partial files removed."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666 & ~_UMASK)
    except OSError as exc:
        raise _named(exc, path) from None
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        if sync:
            os.fsync(fd)
    except OSError as exc:
        os.close(fd)
        Path(path).unlink(missing_ok=True)
        raise _named(exc, path) from None
    os.close(fd)


def fsync_dir(path: Path) -> None:
    """Make renames and new entries in folder ``path`` durable (no-op where unsupported)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems cannot fsync a folder; the rename is still atomic
    finally:
        os.close(fd)


def rename(src: Path, dst: Path) -> None:
    try:
        os.replace(src, dst)
    except OSError as exc:
        raise _named(exc, dst) from None


def symlink(target: str, link: Path) -> None:
    os.symlink(target, link)


def remove_tree(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    elif path.exists():
        shutil.rmtree(path, ignore_errors=True)


def temp_tag() -> str:
    """``<host>-<pid>``: names a temporary so a later start can tell whether its writer lives."""
    return f"{socket.gethostname().replace('-', '_')}-{os.getpid()}"


def writer_alive(tag: str) -> bool:
    """Whether the process that made a temporary tagged :func:`temp_tag` still runs here."""
    host, _, pid = tag.rpartition("-")
    if host != socket.gethostname().replace("-", "_") or not pid.isdigit():
        return False  # another host's or an old-style temporary: its writer is not ours to wait on
    if int(pid) == os.getpid():
        return False  # a reused pid (containers restart at small pids): not a writer of ours yet
    if os.name == "nt":
        return False  # os.kill(pid, 0) would send CTRL_C_EVENT there; assume it has exited
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


_TEMP = re.compile(r"^\..*\.tmp-(?P<tag>[^/]+-\d+)$")


def remove_dead_temps(folder: Path) -> list[Path]:
    """Remove the temporaries in ``folder`` (``.NAME.tmp-<host>-<pid>``) whose writer is dead;
    returns what was removed."""
    removed: list[Path] = []
    if not Path(folder).is_dir():
        return removed
    for p in sorted(Path(folder).iterdir()):
        m = _TEMP.match(p.name)
        dead = m is not None and not writer_alive(m.group("tag"))
        if dead:
            remove_tree(p)
            removed.append(p)
    return removed


def atomic_write(path: Path, write: Callable[[Path], None], durable: bool = True) -> None:
    """Call ``write(tmp)`` on a temp file beside ``path``, fsync it, then ``os.replace`` it to
    ``path``. On any failure the temp file is removed and ``path`` is untouched.

    ``durable=False`` leaves out the fsyncs (of the file and of the folder after the rename):
    the file still appears only whole, and a crashed process leaves no part of it under its
    name, but a power cut may lose it. For outputs a rerun recreates (prediction overlays),
    where three fsyncs per file cost more than drawing it."""
    path = Path(path)
    make_dir(path.parent)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp-{temp_tag()}",
                                   dir=path.parent)  # fmt: skip
    except OSError as exc:
        raise _named(exc, path) from None
    os.close(fd)
    try:
        write(Path(tmp))
        if durable:
            with open(tmp, "rb+") as handle:
                os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file normal permissions
        os.replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise _named(exc, path) from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if durable:
        fsync_dir(path.parent)


def atomic_write_bytes(path: Path, data: bytes, durable: bool = True) -> None:
    def put(tmp: Path) -> None:
        tmp.unlink()
        write_bytes(tmp, data, sync=False)  # atomic_write syncs it when durable

    atomic_write(path, put, durable)


def atomic_write_text(path: Path, text: str, durable: bool = True) -> None:
    atomic_write_bytes(path, text.encode("utf-8"), durable)


def json_safe(value: Any) -> Any:
    """``value`` with every non-finite float replaced by None (JSON has no NaN or Infinity)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


def dumps_json(obj: Any, **kwargs: Any) -> str:
    """``json.dumps`` that always produces valid JSON (non-finite floats become null)."""
    return json.dumps(json_safe(obj), allow_nan=False, **kwargs)


def atomic_write_json(path: Path, obj: Any, indent: int | None = 2, durable: bool = True) -> None:
    atomic_write_text(path, dumps_json(obj, indent=indent) + "\n", durable)


def free_bytes(folder: Path) -> int:
    """Bytes free to this user on the file system holding ``folder`` (or its nearest parent)."""
    probe = Path(folder)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return shutil.disk_usage(probe).free


def check_writable(folder: Path, need_bytes: int, what: str, flag: str = "--out") -> None:
    """Fail now, naming ``folder``, if it cannot be written or lacks ``need_bytes`` of room.

    Creates ``folder``, writes and removes a small probe file, then compares the free space
    with ``need_bytes``. Raises OSError (EACCES, EROFS, ENOSPC, ...) with ``folder`` as its file.
    """
    folder = Path(folder)
    make_dir(folder)
    probe = folder / f".write-probe.tmp-{temp_tag()}"
    try:
        write_bytes(probe, b"clusterformer write probe\n")
    finally:
        probe.unlink(missing_ok=True)
    free = free_bytes(folder)
    if free < need_bytes:
        raise OSError(
            errno.ENOSPC,
            f"{free / MIB:.0f} MiB free, {what} needs about {need_bytes / MIB:.0f} MiB; free "
            f"space or choose another {flag}",
            str(folder),
        )


def disk_full(folder: Path, slack: int = MIB) -> bool:
    """Whether the file system of ``folder`` is (nearly) full: used to name ENOSPC that a
    library reported as something else (torch's "unexpected pos", onnx's odd TypeErrors)."""
    try:
        return free_bytes(folder) < slack
    except OSError:
        return False


def no_space(folder: Path) -> OSError:
    """The one-line ENOSPC error for ``folder``."""
    return OSError(errno.ENOSPC, "no space left on device; free space or write elsewhere",
                   str(folder))  # fmt: skip
