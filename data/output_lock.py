"""One writer at a time per output: an advisory lock held for a command's life.

Two ``cf train`` runs on one run folder interleave ``metrics.jsonl`` and overwrite each other's
checkpoints; two ``cf shard-dataset`` runs into one folder delete each other's temporaries. So
every command that writes an output takes its lock first and holds it until it ends:

* a folder output (a run folder, a shard folder, a prediction folder) is locked through
  ``FOLDER/.cf-lock``; a file output (``cf export --out model.onnx``, ``cf eval --out
  metrics.json`` with the prediction files named after it) through ``.NAME.cf-lock`` beside it;
* the lock is ``flock``: the kernel releases it when the holder exits or is killed, so a
  crashed run never leaves a folder locked; the file holds the holder's pid, host and command,
  which the refusal names;
* a second command is refused at once with :class:`OutputInUse` (one line: the output, the
  holder's pid and command); within one process the same output may be taken again (nested
  calls of the library, e.g. ``cf quickstart``);
* the lock file is removed on release, and a command that locked a file another one had just
  removed locks again, so the removal cannot let two writers in.

Where ``fcntl`` does not exist (Windows) outputs are not locked.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

LOCK_NAME = ".cf-lock"


class OutputInUse(ValueError):
    """Another process holds the output's lock; the message names the output and the holder."""


# Lock file -> (descriptor, how many times this process holds it): nested holds share one lock.
_HELD: dict[str, list[int]] = {}
_GUARD = threading.Lock()


def lock_path(output: str | os.PathLike, *, is_file: bool = False) -> Path:
    """The lock file of a folder output, or of a file output (``is_file``)."""
    output = Path(output)
    if is_file:
        return output.parent / f".{output.name}.cf-lock"
    return output / LOCK_NAME


def _holder(fd: int) -> str:
    try:
        text = os.pread(fd, 512, 0).decode("utf-8", "replace").strip()
    except OSError:
        text = ""
    pid, _, rest = text.partition(" ")
    host, _, command = rest.partition(" ")
    if not pid.isdigit():
        return "another process"
    where = "" if host == socket.gethostname() else f" on {host}"
    return f"pid {pid}{where}" + (f" ({command})" if command else "")


def _open_locked(path: Path, output: Path) -> int:
    """A descriptor of ``path`` holding its exclusive lock, or OutputInUse."""
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise OSError(exc.errno, exc.strerror, str(path)) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise OutputInUse(f"{output}: in use by another cf command ({holder}); wait for it "
                              "to end, or write elsewhere") from None  # fmt: skip
        try:  # the previous holder may have removed the file between our open and flock
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)


@contextlib.contextmanager
def hold_output(output: str | os.PathLike, command: str, *, is_file: bool = False) -> Iterator[None]:
    """Hold ``output``'s lock (module docstring) for the ``with`` block; creates the folder
    (of a file output: its parent). Raises OutputInUse when another process holds it."""
    output = Path(output)
    path = lock_path(output, is_file=is_file)
    if fcntl is None:
        yield
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OSError(exc.errno, exc.strerror, str(path.parent)) from None
    key = str(path.resolve())
    with _GUARD:
        held = _HELD.get(key)
        if held is not None and held[2] == os.getpid():
            held[1] += 1
        else:  # not held, or inherited through fork: a child process is another writer
            fd = _open_locked(path, output)
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()} {socket.gethostname()} {command}\n".encode(), 0)
            _HELD[key] = held = [fd, 1, os.getpid()]
    try:
        yield
    finally:
        with _GUARD:
            held[1] -= 1
            if held[1] == 0:
                del _HELD[key]
                with contextlib.suppress(OSError):
                    path.unlink()  # still locked here: a waiting opener re-checks (see above)
                os.close(held[0])
