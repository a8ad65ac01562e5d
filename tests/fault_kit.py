"""What the fault tests (``test_faults*.py``) share: argv for a tiny training run, one-line
error checks, file snapshots, a pickle that leaves a mark when loaded, and small disks.

Full disks use a real tmpfs where this process may mount one (root on Linux) and a
monkeypatched one (``fake``) everywhere else.
"""

from __future__ import annotations

import builtins
import contextlib
import errno
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from cli_runner import run_cf
from safetensors.torch import load_file

from clusterformer.engine import checkpoint as ckpt

MAX_LINE = 300


def cf(args: list[object], capsys: pytest.CaptureFixture) -> tuple[int, str]:
    code = run_cf([str(a) for a in args])
    return code, capsys.readouterr().err


def error_line(err: str) -> str:
    """The one ``cf: error:`` line of a failed command (progress lines may precede it)."""
    lines = [line for line in err.splitlines() if line.startswith("cf: error:")]
    assert len(lines) == 1, err
    assert len(lines[0]) < MAX_LINE, lines[0]
    assert "Traceback" not in err, err
    return lines[0]


def weights_of(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(ckpt.resolve_checkpoint(run)))


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (symlinks followed) by relative path."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}  # fmt: skip


def dotfiles(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob(".*"))


class Payload:
    """Unpickling this creates ``marker``: proof that a loader ran code from a file."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple:
        return (builtins.open, (self.marker, "w"))


def evil_torch_file(path: Path, marker: Path) -> Path:
    torch.save({"step": 1, "optimizer": Payload(marker)}, path)
    return path


# ----------------------------------------------------------------------------- full disks
def mount_tmpfs(where: Path, size: str, *options: str) -> bool:
    if sys.platform != "linux" or os.geteuid() != 0 or not shutil.which("mount"):
        return False
    where.mkdir(parents=True, exist_ok=True)
    opts = ",".join((f"size={size}", *options))
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(where)],
                          capture_output=True)  # fmt: skip
    return done.returncode == 0


@contextlib.contextmanager
def small_disk(where: Path, size: str, kind: str, monkeypatch: pytest.MonkeyPatch,
               *options: str) -> Iterator[Path]:  # fmt: skip
    """A folder on a file system of ``size``: a real tmpfs (``kind="tmpfs"``, skipped where
    mounting is not allowed) or the ``fake`` one: free space reported from ``size`` less what
    was written there, and ``os.write`` under it failing with ENOSPC once it is full (the
    fake sees the writes the toolkit makes itself through ``os.write``, not a library's)."""
    if kind == "tmpfs":
        if not mount_tmpfs(where, size, *options):
            pytest.skip("cannot mount a tmpfs here (needs root on Linux)")
        try:
            yield where
        finally:
            subprocess.run(["umount", "-l", str(where)], capture_output=True)
        return
    where.mkdir(parents=True, exist_ok=True)
    limit = int(size.rstrip("mk")) * (2**20 if size.endswith("m") else 2**10)
    real_usage, real_open, real_write, real_unlink = shutil.disk_usage, os.open, os.write, os.unlink
    sizes: dict[str, int] = {}  # bytes written per file under ``where``
    fds: dict[int, str] = {}

    def inside(path: object) -> bool:
        return os.path.abspath(os.fsdecode(path)).startswith(str(where) + os.sep)

    def usage(path: object) -> object:
        if inside(path) or os.fsdecode(path) == str(where):
            used = sum(sizes.values())
            return shutil._ntuple_diskusage(limit, used, max(limit - used, 0))
        return real_usage(path)

    def fake_open(path, flags, mode=0o777, *, dir_fd=None):  # noqa: ANN001, ANN202
        fd = real_open(path, flags, mode, dir_fd=dir_fd)
        if dir_fd is None and flags & os.O_CREAT and inside(path):
            fds[fd] = os.path.abspath(os.fsdecode(path))
            sizes.setdefault(fds[fd], 0)
        return fd

    def fake_write(fd, data):  # noqa: ANN001, ANN202
        if fd in fds:
            if sum(sizes.values()) + len(data) > limit:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # write(2): no file name
            sizes[fds[fd]] += len(data)
        return real_write(fd, data)

    def fake_unlink(path, *, dir_fd=None):  # noqa: ANN001, ANN202
        if dir_fd is None and inside(path):
            sizes.pop(os.path.abspath(os.fsdecode(path)), None)
        return real_unlink(path, dir_fd=dir_fd)

    monkeypatch.setattr(shutil, "disk_usage", usage)
    monkeypatch.setattr(os, "open", fake_open)
    monkeypatch.setattr(os, "write", fake_write)
    monkeypatch.setattr(os, "unlink", fake_unlink)
    yield where


DISKS = ["tmpfs", "fake"]




def strict_json(path: Path) -> object:
    """``path`` parsed as JSON proper: NaN / Infinity tokens fail."""

    def refuse(token: str) -> None:
        raise AssertionError(f"{path} holds {token}: not JSON")

    return json.loads(path.read_text(), parse_constant=refuse)
