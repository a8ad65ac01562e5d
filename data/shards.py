"""WebDataset shard writer (``cf shard-dataset``): raw source -> ``shard-NNNNNN.tar`` + dataset.json.

Guarantees:

* Deterministic: entries are sorted by key, optionally shuffled with ``random.Random(seed)``,
  and tar headers carry fixed mtime/uid/gid/names, so the same input + seed gives
  byte-identical shards.
* One writer at a time: ``write_shards`` holds ``out``'s lock
  (:mod:`clusterformer.data.output_lock`) from start to end; a second writer is refused with
  one line naming the holder, and the dataset there is untouched.
* Nothing half-written looks whole: shards, skipped.jsonl and dataset.json are first written
  completely under temporary names (``.shard-NNNNNN.tar.tmp-<pid>``, ...), fsynced;
  dataset.json is the last file moved into place.
* A dataset already in ``out`` is replaced only once the new one is complete: until then it
  stays readable, and a failure (bad sample, full disk) leaves it untouched. The swap removes
  its dataset.json first (the folder stops claiming to be a dataset), renames the new shards
  in, deletes the old shards the new index does not list, then writes dataset.json. On any
  failure the temporary files are removed; a full disk is an OSError naming the file.
* Bad samples stop the run (``on_error="stop"``, the SampleError propagates) or are skipped,
  counted in dataset.json ("skipped") and listed in ``skipped.jsonl`` (key, path, reason).
"""

from __future__ import annotations

import errno
import io
import json
import os
import random
import tarfile
from collections.abc import Callable
from pathlib import Path

from clusterformer.data.output_lock import hold_output
from clusterformer.data.records import Record, encode_record
from clusterformer.data.source import ON_ERROR, Source, iter_records

DATASET_VERSION = 1
INDEX_NAME = "dataset.json"
SKIPPED_NAME = "skipped.jsonl"


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.tar"


def _tmp_name(name: str) -> str:
    return f".{name}.tmp-{os.getpid()}"  # this process's own: no other writer can clash


def _is_temporary(path: Path) -> bool:
    name = path.name
    ours = (f".{INDEX_NAME}.tmp", f".{SKIPPED_NAME}.tmp", ".shard-")
    return name.startswith(ours) and ".tmp" in name


def _remove_temporaries(out: Path) -> None:
    """Temporaries a killed run left behind (never a finished dataset's files). Called while
    holding ``out``'s lock, so no live writer owns any of them."""
    for path in sorted(out.iterdir()):
        if path.is_file() and _is_temporary(path):
            path.unlink()


def _replace_dataset(out: Path, shards: list[str], index_tmp: Path, skipped_tmp: Path) -> None:
    """Swap the complete new dataset (temporaries) in for whatever ``out`` held."""
    index = out / INDEX_NAME
    index.unlink(missing_ok=True)  # first: the folder stops claiming to be a dataset
    for name in shards:
        os.replace(out / _tmp_name(name), out / name)
    for path in sorted(out.iterdir()):  # the old dataset's extra shards
        old_shard = path.name.startswith("shard-") and path.name.endswith(".tar")
        if old_shard and path.is_file() and path.name not in shards:
            path.unlink()
    os.replace(skipped_tmp, out / SKIPPED_NAME)
    _fsync_dir(out)
    os.replace(index_tmp, index)  # last: the new dataset is complete
    _fsync_dir(out)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # not supported everywhere; the renames are atomic regardless
    finally:
        os.close(fd)


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


def _write_temporary(path: Path, text: str) -> Path:
    """Write ``text`` (fsynced) to the temporary name of ``path``; returns that name."""
    tmp = path.with_name(_tmp_name(path.name))
    try:
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise _named(exc, path) from None
    return tmp


def _named(exc: OSError, path: Path) -> OSError:
    """A write error names its file (a bare write() failure carries no name)."""
    return exc if exc.filename else OSError(exc.errno, exc.strerror or str(exc), str(path))


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
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise _named(exc, out) from None
    with hold_output(out, "cf shard-dataset"):
        return _write_locked(source, out, samples_per_shard=samples_per_shard,
                             max_bytes=int(max_shard_mb * 1024 * 1024), shuffle=shuffle,
                             seed=seed, on_error=on_error, progress=progress)  # fmt: skip


def _write_locked(source: Source, out: Path, *, samples_per_shard: int, max_bytes: int,
                  shuffle: bool, seed: int, on_error: str,
                  progress: Callable[[int], None] | None) -> dict:  # fmt: skip
    _remove_temporaries(out)
    entries = sorted(source.entries, key=lambda e: e.key)
    if shuffle:
        random.Random(seed).shuffle(entries)
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
        skipped_tmp = _write_temporary(
            out / SKIPPED_NAME,
            "".join(json.dumps(exc.as_dict(), sort_keys=True) + "\n" for exc in skipped),
        )
        info = _index(source, done, skipped, shuffle, seed, samples_per_shard)
        text = json.dumps(info, indent=1, allow_nan=False) + "\n"  # never NaN: not JSON
        index_tmp = _write_temporary(out / INDEX_NAME, text)
    except BaseException as exc:
        writing = current.tmp if current is not None else out
        if current is not None:
            try:
                current.close()
            except Exception:  # noqa: BLE001 - already failing; cleanup must go on
                pass
            done.append(current)
        for shard in done:
            shard.tmp.unlink(missing_ok=True)
        for name in (SKIPPED_NAME, INDEX_NAME):
            (out / _tmp_name(name)).unlink(missing_ok=True)
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise OSError(exc.errno, "no space left on device for the new shards; the dataset "
                          "there is unchanged: free space or write elsewhere", str(out)) from None
        if isinstance(exc, OSError):  # name the file being written
            raise _named(exc, writing) from None
        raise
    # Everything new is complete on disk: only now is the previous dataset replaced.
    _replace_dataset(out, [s.name for s in done], index_tmp, skipped_tmp)
    return info


def _index(source: Source, done: list[_ShardTar], skipped: list, shuffle: bool, seed: int,
           samples_per_shard: int) -> dict:  # fmt: skip
    """The dataset.json record of a finished set of shards."""
    return {
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
