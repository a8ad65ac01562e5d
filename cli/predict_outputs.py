"""What ``cf predict`` writes: an overlay PNG per image (per frame for videos) and the records,
either a JSON file per image plus predictions.json, or one JSON line per image / frame.

Overlays and per-image JSON are drawn, encoded and written on ``threads`` threads (Pillow's
PNG encoder releases the GIL), so they overlap with the model; with 0 threads everything is
written in order, inline. Every path is listed in ``written`` before it is written, so a failed
run can remove what it left (after the threads have finished). Each file appears whole or not
at all (temporary name, rename) but is not fsynced: a rerun recreates it, and the three fsyncs
per file took longer than the model on 640x480 photos.

Where each input's outputs go is :func:`output_names`: ``OUT/<name>.png`` and
``OUT/<name>.json`` (a video: the folder ``OUT/<name>/``), ``<name>`` the input's stem, made
unique so that no two inputs share an output, none takes the combined records' names and none
replaces an input that lives in OUT.
"""

from __future__ import annotations

import json
import unicodedata
from collections.abc import Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

# Writes waiting at most: beyond this the oldest is waited for (bounds the images held).
MAX_PENDING = 64
# What the run as a whole writes in OUT (one or the other); no input's outputs take these.
COMBINED = ("predictions.json", "predictions.jsonl")


def fold(name: str) -> str:
    """``name`` as a case-insensitive file system compares it: macOS and Windows would take
    ``A.png`` and ``a.png`` (or two Unicode spellings of an accent) for one file."""
    return unicodedata.normalize("NFC", name).casefold()


def output_entries(name: str, video: bool) -> tuple[str, ...]:
    """What an input called ``name`` creates directly in OUT."""
    return (name,) if video else (f"{name}.png", f"{name}.json")


def entry_in(out: Path, path: Path) -> str | None:
    """The folded name of the entry of folder ``out`` that ``path`` is or lies under (both
    absolute), or None when ``path`` is not inside ``out``."""
    parts, base = [fold(p) for p in path.parts], [fold(p) for p in out.parts]
    if len(parts) > len(base) and parts[: len(base)] == base:
        return parts[len(base)]
    return None


def output_names(
    images: Sequence[Path], out: Path, inputs: Iterable[Path] = (),
    reserved: Iterable[str] = COMBINED,
) -> list[str]:  # fmt: skip
    """The name each of ``images`` writes its outputs under, in input order: its stem, or the
    stem with ``-2``, ``-3``, ... appended (the first not taken) when one of its outputs
    (:func:`output_entries`) would be an entry already taken, compared case-insensitively:
    an earlier input's output, a name in ``reserved``, or the entry of OUT that one of
    ``inputs`` is or lies in. ``out`` and ``inputs`` are absolute paths (the caller resolves
    them): this only compares names, so the same arguments always give the same names."""
    from clusterformer.data.video import is_video

    # "." and ".." are OUT and the folder above it: a video "...mp4" would write its frames there.
    taken = {".", "..", *(fold(name) for name in reserved)}
    taken.update(e for path in inputs if (e := entry_in(out, path)) is not None)
    # Per folded stem (and kind) the suffix to try first: every smaller one is taken for good,
    # so a thousand files called 000000.jpg cost a thousand tries, not half a million.
    first: dict[tuple[str, bool], int] = {}
    names = []
    for image in images:
        stem, video = image.stem, is_video(image)
        key = (fold(stem), video)
        k = first.get(key, 1)
        while True:
            name = stem if k == 1 else f"{stem}-{k}"
            entries = [fold(e) for e in output_entries(name, video)]
            if taken.isdisjoint(entries):
                break
            k += 1
        first[key] = k + 1
        taken.update(entries)
        names.append(name)
    return names


class PredictionWriter:
    def __init__(self, out: Path, stream: Path | None, written: list[Path], threads: int) -> None:
        self.out, self.written, self.everything = out, written, []
        self.handle = None
        if stream is not None:
            stream.parent.mkdir(parents=True, exist_ok=True)
            written.append(stream)
            self.handle = stream.open("w", encoding="utf-8")
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="overlay") if threads > 0 else None
        self.pending: list[Future] = []

    def add(self, record: dict[str, Any], raw: Any, name: str, frame: int | None) -> None:
        """One image's (or video frame's) record and the decoded ``raw`` (3, H, W) uint8 image,
        written under the input's ``name`` (:func:`output_names`)."""
        self.everything.append(record)
        if frame is None:
            png, json_path = self.out / f"{name}.png", self.out / f"{name}.json"
        else:
            png, json_path = self.out / name / f"{frame:06d}.png", None
            if not png.parent.exists():
                png.parent.mkdir()
                self.written.append(png.parent)
        if self.handle is not None:
            self.handle.write(json.dumps(record) + "\n")
            json_path = None
        self.written.extend(p for p in (png, json_path) if p is not None)
        if self.pool is None:
            _write_one(record, raw, png, json_path)
            return
        self.pending.append(self.pool.submit(_write_one, record, raw, png, json_path))
        while len(self.pending) > MAX_PENDING or (self.pending and self.pending[0].done()):
            self.pending.pop(0).result()  # a failed write stops the run here

    def drain(self) -> None:
        """Wait for the writes in flight (raising the first failure): DataLoader workers fork
        after this, with no writer thread holding a lock the children could need."""
        while self.pending:
            self.pending.pop(0).result()

    def close(self, complete: bool) -> None:
        """Wait for every write (raising the first failure when ``complete``); write
        predictions.json when the run completed without a JSON Lines stream."""
        if self.pool is not None:
            self.pool.shutdown(wait=True)
            if complete:
                for future in self.pending:
                    future.result()
        if self.handle is not None:
            self.handle.close()
        elif complete:
            self.written.append(self.out / "predictions.json")
            write_json(self.out / "predictions.json", self.everything)


def _write_one(record: dict[str, Any], raw: Any, png: Path, json_path: Path | None) -> None:
    from clusterformer.tasks.predictions import draw_overlay

    save_png(draw_overlay(raw, record), png)
    if json_path is not None:
        write_json(json_path, record)


def save_png(canvas: Any, path: Path) -> None:
    """Write an RGB PIL image (what ``draw_overlay`` draws) as PNG."""
    import numpy as np

    from clusterformer.engine.files import atomic_write_bytes

    atomic_write_bytes(path, encode_rgb_png(np.asarray(canvas)), durable=False)


def _chunk(tag: bytes, data: bytes) -> bytes:
    import struct
    import zlib

    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))


def encode_rgb_png(rgb: Any, level: int = 1) -> bytes:
    """``(H, W, 3)`` uint8 array -> PNG bytes, every row with the "up" filter, zlib ``level``.

    Why not Pillow: it picks a filter per row by trying all five, which on a 640x480 photo
    took 26 ms at zlib level 1 (12 ms with no compression at all) against 14 ms here for a
    file of about the same size (482 vs 463 KiB); overlays are most of ``cf predict``'s time
    on photos. numpy and zlib release the GIL, so the writer threads run in parallel.
    """
    import struct
    import zlib

    import numpy as np

    rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.shape[0] == 0 or rgb.shape[1] == 0:
        raise ValueError(f"expected a non-empty (H, W, 3) image, got shape {rgb.shape}")
    height, width, _ = rgb.shape
    rows = rgb.reshape(height, width * 3)
    filtered = np.empty((height, width * 3 + 1), np.uint8)
    filtered[:, 0] = 2  # filter type "up": each byte minus the one above it (mod 256)
    filtered[0, 1:] = rows[0]
    np.subtract(rows[1:], rows[:-1], out=filtered[1:, 1:])
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB, no interlace
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header)
            + _chunk(b"IDAT", zlib.compress(filtered.tobytes(), level)) + _chunk(b"IEND", b""))


def write_json(path: Path, obj: Any) -> None:
    from clusterformer.engine.files import atomic_write_json

    atomic_write_json(path, obj, durable=False)
