"""What ``cf predict`` writes: an overlay PNG per image (per frame for videos) and the records,
either a JSON file per image plus predictions.json, or one JSON line per image / frame.

Overlays and per-image JSON are drawn, encoded and written on ``threads`` threads (Pillow's
PNG encoder and fsync release the GIL), so they overlap with the model; with 0 threads
everything is written in order, inline. Every path is listed in ``written`` before it is
written, so a failed run can remove what it left (after the threads have finished).
"""

from __future__ import annotations

import json
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

# Writes waiting at most: beyond this the oldest is waited for (bounds the images held).
MAX_PENDING = 64


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

    def add(self, record: dict[str, Any], raw: Any, stem: str, frame: int | None) -> None:
        """One image's (or video frame's) record and the decoded ``raw`` (3, H, W) uint8 image."""
        self.everything.append(record)
        if frame is None:
            png, json_path = self.out / f"{stem}.png", self.out / f"{stem}.json"
        else:
            png, json_path = self.out / stem / f"{frame:06d}.png", None
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
    import io

    from clusterformer.engine.files import atomic_write_bytes

    buffer = io.BytesIO()
    # zlib level 1: overlays are previews; level 6 (the default) took 3x longer than the model.
    canvas.save(buffer, format="PNG", compress_level=1)
    atomic_write_bytes(path, buffer.getvalue())


def write_json(path: Path, obj: Any) -> None:
    from clusterformer.engine.files import atomic_write_json

    atomic_write_json(path, obj)
