"""Fault injection for the crash tests: run code in a forked child and SIGKILL it at a chosen
file operation, as a power cut or ``kill -9`` would.

:class:`FileOps` wraps the ``os`` functions that create, write, sync, rename, link or delete
files (``os.open`` with O_CREAT, ``write``, ``fsync``, ``replace``, ``rename``, ``symlink``,
``mkdir``, ``unlink``, ``rmdir``) and records each call on a path under ``root``. It knows
nothing about how the code under test writes its checkpoints, so the same injection points
exist for any implementation. With ``kill_at=k`` the process kills itself before the k-th
recorded operation, after it, or halfway through it (``torn``: half the bytes of a write).
"""

from __future__ import annotations

import os
import signal
import traceback
from collections.abc import Callable
from pathlib import Path

WHEN = ("before", "after", "torn")


class FileOps:
    """Record (and optionally die at) file operations under ``root`` in this process."""

    def __init__(self, root: Path, kill_at: int | None = None, when: str = "before") -> None:
        self.root = os.path.realpath(root)
        self.kill_at, self.when = kill_at, when
        self.ops: list[tuple[str, str]] = []
        self._fds: dict[int, str] = {}

    def _under(self, path: str | None) -> bool:
        return path is not None and (path == self.root or path.startswith(self.root + os.sep))

    def _resolve(self, path: object, dir_fd: int | None) -> str | None:
        if isinstance(path, int):
            return self._fds.get(path)
        base = self._fds.get(dir_fd) if dir_fd is not None else None
        if dir_fd is not None and base is None:
            return None
        text = os.fsdecode(path)
        full = os.path.join(base, text) if base else text
        return os.path.join(os.path.realpath(os.path.dirname(os.path.abspath(full))),
                            os.path.basename(full))  # fmt: skip

    def _step(self, name: str, path: str | None, run: Callable[[], object],
              torn: Callable[[], object] | None = None) -> object:  # fmt: skip
        if not self._under(path):
            return run()
        self.ops.append((name, path))
        index = len(self.ops)
        if index == self.kill_at and self.when == "before":
            _die()
        if index == self.kill_at and self.when == "torn" and torn is not None:
            torn()
            _die()
        try:
            return run()
        finally:  # also after an operation that failed (mkdir of an existing folder)
            if index == self.kill_at:
                _die()

    def install(self) -> None:
        """Patch ``os`` in this process (meant for a forked child: never undone)."""
        real = {n: getattr(os, n) for n in ("open", "write", "fsync", "replace", "rename",
                                            "symlink", "mkdir", "unlink", "remove", "rmdir",
                                            "close")}  # fmt: skip

        def op_open(path, flags, mode=0o777, *, dir_fd=None):  # noqa: ANN001, ANN202
            where = self._resolve(path, dir_fd)
            call = lambda: real["open"](path, flags, mode, dir_fd=dir_fd)  # noqa: E731
            fd = self._step("open", where, call) if flags & os.O_CREAT else call()
            if where is not None:
                self._fds[fd] = where
            return fd

        def op_write(fd, data):  # noqa: ANN001, ANN202
            half = memoryview(data)[: max(len(data) // 2, 1)]
            return self._step("write", self._fds.get(fd), lambda: real["write"](fd, data),
                              lambda: real["write"](fd, half))  # fmt: skip

        def op_close(fd):  # noqa: ANN001, ANN202
            self._fds.pop(fd, None)
            return real["close"](fd)

        def two_paths(name: str):  # noqa: ANN202
            def op(src, dst, *, src_dir_fd=None, dst_dir_fd=None):  # noqa: ANN001, ANN202
                where = self._resolve(dst, dst_dir_fd) or self._resolve(src, src_dir_fd)
                return self._step(name, where, lambda: real[name](
                    src, dst, src_dir_fd=src_dir_fd, dst_dir_fd=dst_dir_fd))  # fmt: skip
            return op

        def op_symlink(src, dst, target_is_directory=False, *, dir_fd=None):  # noqa: ANN001, ANN202
            return self._step("symlink", self._resolve(dst, dir_fd), lambda: real["symlink"](
                src, dst, target_is_directory, dir_fd=dir_fd))  # fmt: skip

        def one_path(name: str):  # noqa: ANN202
            def op(path, *args, dir_fd=None, **kwargs):  # noqa: ANN001, ANN202
                return self._step(name, self._resolve(path, dir_fd), lambda: real[name](
                    path, *args, dir_fd=dir_fd, **kwargs))  # fmt: skip
            return op

        os.open, os.write, os.close = op_open, op_write, op_close
        os.fsync = lambda fd: self._step("fsync", self._fds.get(fd), lambda: real["fsync"](fd))
        os.replace, os.rename = two_paths("replace"), two_paths("rename")
        os.symlink = op_symlink
        os.mkdir, os.unlink = one_path("mkdir"), one_path("unlink")
        os.remove, os.rmdir = one_path("remove"), one_path("rmdir")


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def in_child(body: Callable[[], object]) -> int:
    """Run ``body`` in a forked child; its exit code (-9 when it was SIGKILLed).

    The child uses one intra-op thread: OpenMP thread pools do not survive a fork.
    """
    import torch

    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 0
        try:
            torch.set_num_threads(1)
            body()
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        except BaseException:  # noqa: BLE001 - report, then leave without pytest's cleanup
            traceback.print_exc()
            code = 70
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def count_ops(root: Path, body: Callable[[FileOps], object]) -> list[tuple[str, str]]:
    """The file operations ``body`` makes under ``root`` (run in a child, nothing killed).

    ``body`` gets the installed :class:`FileOps`; the list comes back through a pipe.
    """
    import json

    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 0
        try:
            import torch

            torch.set_num_threads(1)
            os.close(read)
            ops = FileOps(root)
            ops.install()
            try:
                body(ops)
            except SystemExit as exc:  # `cf` exits; only a failure counts as one
                if exc.code not in (0, None):
                    raise
            payload = json.dumps(ops.ops).encode()
            while payload:
                payload = payload[os.write(write, payload):]
        except BaseException:  # noqa: BLE001
            traceback.print_exc()
            code = 70
        finally:
            os._exit(code)
    os.close(write)
    chunks = []
    while chunk := os.read(read, 1 << 16):
        chunks.append(chunk)
    os.close(read)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, "counting run failed"
    return [tuple(op) for op in json.loads(b"".join(chunks))]
