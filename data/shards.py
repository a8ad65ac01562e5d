"""WebDataset shard writer (``cf shard-dataset``): raw source -> ``shard-NNNNNN.tar`` + dataset.json.

Guarantees:

* Deterministic: entries are sorted by key, optionally shuffled with ``random.Random(seed)``,
  and tar headers carry fixed mtime/uid/gid/names, so the same input + seed gives
  byte-identical shards.
* Nothing half-written looks whole: shards are written as ``.shard-NNNNNN.tar.tmp`` and only
  renamed once every sample has been read; dataset.json is written last (temp + rename).
  A previous run's dataset.json is removed before anything else, and its shards after it.
  On any failure the temporary files are removed.
* Bad samples stop the run (``on_error="stop"``, the SampleError propagates) or are skipped,
  counted in dataset.json ("skipped") and listed in ``skipped.jsonl`` (key, path, reason).
"""

from __future__ import annotations

import io
import json
import os
import random
import tarfile
from collections.abc import Callable
from pathlib import Path

from clusterformer.data.records import Record, encode_record
from clusterformer.data.source import ON_ERROR, Source, iter_records

DATASET_VERSION = 1
INDEX_NAME = "dataset.json"
SKIPPED_NAME = "skipped.jsonl"


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.tar"


def _tmp_name(name: str) -> str:
    return f".{name}.tmp"


def _is_ours(path: Path) -> bool:
    name = path.name
    if name in (INDEX_NAME, SKIPPED_NAME) or name.startswith((f".{INDEX_NAME}", f".{SKIPPED_NAME}")):
        return True
    return (name.startswith("shard-") and name.endswith(".tar")) or (
        name.startswith(".shard-") and name.endswith(".tmp")
    )


def clear_output(out: Path) -> None:
    """Remove a previous run's index, shards and temporaries (only files this writer makes)."""
    index = out / INDEX_NAME
    if index.exists():
        index.unlink()  # first: from here on the folder no longer claims to be a dataset
    for path in sorted(out.iterdir()):
        if path.is_file() and _is_ours(path):
            path.unlink()


class _ShardTar:
    """One tar being written under a temporary name, with deterministic headers."""

    def __init__(self, out: Path, index: int) -> None:
        self.name = shard_name(index)
        self.tmp = out / _tmp_name(self.name)
        self.file = open(self.tmp, "wb")  # noqa: SIM115 - closed in close()
        self.tar = tarfile.open(fileobj=self.file, mode="w", format=tarfile.PAX_FORMAT)
        self.num_samples = 0

    def add(self, key: str, members: dict[str, bytes]) -> None:
        for suffix, data in members.items():
            info = tarfile.TarInfo(f"{key}.{suffix}")
            info.size = len(data)
            info.mtime = 0
            info.mode = 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            self.tar.addfile(info, io.BytesIO(data))
        self.num_samples += 1

    def size(self) -> int:
        return self.file.tell()

    def close(self) -> None:
        self.tar.close()
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()


def _record_size(members: dict[str, bytes]) -> int:
    # Tar cost: a 512-byte header per member plus the data padded to 512 bytes.
    return sum(512 + (len(d) + 511) // 512 * 512 for d in members.values())


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def write_shards(
    source: Source,
    out: str | Path,
    *,
    samples_per_shard: int = 1000,
    max_shard_mb: float = 1024.0,
    shuffle: bool = True,
    seed: int = 0,
    on_error: str = "stop",
    progress: Callable[[int], None] | None = None,
) -> dict:
    """Write ``source`` as WebDataset shards under ``out``; returns the dataset.json dict.

    A shard closes after ``samples_per_shard`` samples or before exceeding ``max_shard_mb``
    (a single larger sample gets a shard of its own). ``progress(n)`` is called with the
    number of entries handled so far.
    """
    if samples_per_shard < 1:
        raise ValueError(f"--samples-per-shard must be at least 1, got {samples_per_shard}")
    if on_error not in ON_ERROR:
        raise ValueError(f"--on-error must be one of {', '.join(ON_ERROR)}, got {on_error!r}")
    if max_shard_mb <= 0:
        raise ValueError(f"--max-shard-mb must be positive, got {max_shard_mb}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    clear_output(out)
    entries = sorted(source.entries, key=lambda e: e.key)
    if shuffle:
        random.Random(seed).shuffle(entries)
    max_bytes = int(max_shard_mb * 1024 * 1024)
    done: list[_ShardTar] = []
    current: _ShardTar | None = None
    skipped: list = []
    handled = 0

    def on_record(record: Record) -> None:
        nonlocal current
        members = encode_record(record)
        if current is not None and (
            current.num_samples >= samples_per_shard
            or current.size() + _record_size(members) + 1024 > max_bytes
        ):
            current.close()
            done.append(current)
            current = None
        if current is None:
            current = _ShardTar(out, len(done))
        current.add(record.key, members)

    try:
        for entry in entries:
            for record in iter_records([entry], on_error, skipped):
                on_record(record)
            handled += 1
            if progress is not None:
                progress(handled)
        if current is not None:
            current.close()
            done.append(current)
            current = None
        # Every shard is complete: only now do they get their real names.
        for shard in done:
            os.replace(shard.tmp, out / shard.name)
    except BaseException:
        if current is not None:
            try:
                current.close()
            except Exception:  # noqa: BLE001 - already failing; cleanup must go on
                pass
            done.append(current)
        for shard in done:
            for path in (shard.tmp, out / shard.name):
                if path.exists():
                    path.unlink()
        raise
    _write_atomic(
        out / SKIPPED_NAME,
        "".join(json.dumps(exc.as_dict(), sort_keys=True) + "\n" for exc in skipped),
    )
    info = {
        "version": DATASET_VERSION,
        **{k: v for k, v in source.info.items() if k not in ("format", "categories")},
        "format": source.info["format"],
        "categories": source.info["categories"],
        "num_samples": sum(s.num_samples for s in done),
        "skipped": len(skipped),
        "shards": [{"name": s.name, "num_samples": s.num_samples} for s in done],
        "shuffle": bool(shuffle),
        "seed": int(seed),
        "samples_per_shard": int(samples_per_shard),
    }
    _write_atomic(out / INDEX_NAME, json.dumps(info, indent=1) + "\n")
    return info
