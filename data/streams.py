"""Where samples come from: tar shards (local or webdataset URLs) and raw dataset folders.

A *source* exposes ``counts`` (samples per unit), ``read(unit, keep)`` yielding
``(position, members)`` for the kept positions of one unit, ``decode(members)`` -> the decoded
sample dict, and ``info`` (dataset.json or the reader's info). Both sources pickle cheaply so
DataLoader workers can receive them under any start method.
"""

from __future__ import annotations

import json
import os
import tarfile
import zlib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from .errors import DatasetError
from .records import decode_record, encode_record
from .sample_spec import SampleSpec, sample_spec


def _is_url(spec: str) -> bool:
    return spec.startswith("pipe:") or ("://" in spec and not spec.startswith("file://"))


def _open_stream(url: str):
    """Binary stream for a local path, ``file://``, ``pipe:cmd`` or http(s) URL (via webdataset)."""
    if _is_url(url):
        from webdataset.gopen import gopen

        return gopen(url, "rb")
    return open(url.removeprefix("file://"), "rb")  # noqa: SIM115 - closed by the caller


def iter_tar(
    url: str, keep: Callable[[int], bool], expected: int | None = None
) -> Iterator[tuple[int, dict[str, Any]]]:
    """(position, members) of the samples in one tar whose position passes ``keep``.

    Members follow webdataset: ``<key>.<suffix>``, key = name up to the first dot of the file
    name, consecutive members with the same key form one sample. Unkept samples are not read.
    A tar that does not read to its end, a sample with two members of one suffix (two samples
    sharing a key) and, with ``expected`` (dataset.json's count), a tar holding another number
    of samples raise :class:`~clusterformer.data.errors.DatasetError` naming the tar.
    """
    try:
        with _open_stream(url) as stream, tarfile.open(fileobj=stream, mode="r|*") as tar:
            key, pos, members, seen, wanted = None, -1, {}, set(), False
            keys: set[str] = set()
            for member in tar:
                if not member.isreg():
                    continue
                folder, _, name = member.name.rpartition("/")
                stem, _, suffix = name.partition(".")
                if name.startswith("__") or not suffix:
                    continue
                prefix = f"{folder}/{stem}" if folder else stem
                if prefix != key:
                    if prefix in keys:
                        raise DatasetError(url, f"two samples share the key {prefix[:80]!r}; "
                                           "rewrite the shards")  # fmt: skip
                    keys.add(prefix)
                    if wanted:
                        yield pos, members
                    key, pos, seen = prefix, pos + 1, set()
                    wanted = keep(pos)
                    members = {"__key__": prefix, "__url__": url}
                if suffix.lower() in seen:
                    raise DatasetError(url, f"sample {prefix[:80]!r} has two {suffix!r} members "
                                       "(two samples share one key); rewrite the shards")  # fmt: skip
                seen.add(suffix.lower())
                if wanted:
                    members[suffix.lower()] = tar.extractfile(member).read()
            if wanted:
                yield pos, members
    except (tarfile.TarError, EOFError, zlib.error) as exc:
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise DatasetError(url, f"unreadable tar ({reason}); the shard is damaged or "
                           "truncated: rewrite it (cf shard-dataset)") from None  # fmt: skip
    if expected is not None and pos + 1 != expected:
        raise DatasetError(url, f"holds {pos + 1} samples, dataset.json lists {expected}; the "
                           "index is stale or the shard damaged: rewrite the shards "
                           "(cf shard-dataset)")  # fmt: skip


class ShardSource:
    """Tar shards listed in dataset.json; picklable so DataLoader workers can hold it."""

    def __init__(self, urls: Sequence[str], counts: Sequence[int], info: dict) -> None:
        self.urls, self.counts, self.info = list(urls), [int(c) for c in counts], info

    def where(self, unit: int) -> str:
        return self.urls[unit]

    def read(self, unit: int, keep: Callable[[int], bool]) -> Iterator[tuple[int, dict]]:
        return iter_tar(self.urls[unit], keep, self.counts[unit])

    def decode(self, members: dict) -> dict:
        return decode_record(members, self.info)


def _raw_layouts(root: Path) -> dict[str, dict[str, Path]]:
    """Raw formats found in ``root``: a ``cf make-shapes`` folder holds all four."""

    def first(*paths: Path) -> Path | None:
        return next((p for p in paths if p.exists()), None)

    def single(folder: Path, pattern: str) -> Path | None:
        found = sorted(folder.glob(pattern)) if folder.is_dir() else []
        return found[0] if len(found) == 1 else None

    images, ann_dir, out = root / "images", root / "annotations", {}
    if images.is_dir():
        instances = first(root / "instances.json") or single(ann_dir, "instances*.json")
        if instances:
            out["coco"] = {"images": images, "annotations": instances}
        panoptic = first(root / "panoptic.json") or single(ann_dir, "panoptic*.json")
        if panoptic and (root / "panoptic").is_dir():
            out["coco-panoptic"] = {"images": images, "annotations": panoptic,
                                    "masks": root / "panoptic"}  # fmt: skip
        labels = first(root / "semantic") or (ann_dir if any(ann_dir.glob("*.png")) else None)
        if labels:
            out["ade20k"] = {"images": images, "masks": labels,
                             "annotations": first(root / "classes.json")}  # fmt: skip
    if (root / "classes").is_dir():
        out["imagefolder"] = {"images": root / "classes"}
    elif not out and any(p.is_dir() for p in root.iterdir()):
        out["imagefolder"] = {"images": root}
    return out


def open_raw(path: str | os.PathLike, task: str | SampleSpec | None = None) -> Any:
    """Open a raw dataset folder with the format readers; ``task`` picks among several formats."""
    return open_raw_formats(path, None if task is None else sample_spec(task).formats)


def open_raw_formats(path: str | os.PathLike, formats: Sequence[str] | None) -> Any:
    """Open a raw dataset folder in the first of ``formats`` it holds (any, if it holds one)."""
    from .formats import open_source

    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such dataset folder (nor a dataset.json)")
    layouts = _raw_layouts(root)
    if formats is None and len(layouts) > 1:
        raise ValueError(f"{root}: holds several raw formats ({', '.join(layouts)}); "
                         "pass the task to choose one")  # fmt: skip
    wanted = tuple(formats) if formats is not None else tuple(layouts)
    fmt = next((f for f in wanted if f in layouts), None)
    if fmt is None:
        need = " or ".join(wanted) if wanted else "any known format"
        raise ValueError(f"{root}: no dataset.json and no raw {need} layout found")
    return open_source(fmt, **layouts[fmt])


class RawSource:
    """A raw dataset folder served in fixed-size chunks ("units").

    Pickles as (root, formats) and reopens in the receiving process: reader entries hold
    closures.
    """

    CHUNK = 64

    def __init__(self, root: str, formats: Sequence[str] | None) -> None:
        self.root, self.formats = root, None if formats is None else tuple(formats)
        source = open_raw_formats(root, self.formats)
        self.entries, self.info = source.entries, source.info
        n = len(self.entries)
        self.counts = [min(self.CHUNK, n - s) for s in range(0, n, self.CHUNK)]

    def __getstate__(self) -> dict:
        return {"root": self.root, "formats": self.formats}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["root"], state["formats"])

    def where(self, unit: int) -> str:
        return self.root

    def read(self, unit: int, keep: Callable[[int], bool]) -> Iterator[tuple[int, dict]]:
        first = unit * self.CHUNK
        for pos in range(self.counts[unit]):
            if keep(pos):
                entry = self.entries[first + pos]
                # Loading may raise SampleError; the dataset applies on_error to it.
                yield pos, {"__key__": entry.key, "__url__": entry.path, "__entry__": entry}

    def decode(self, members: dict) -> dict:
        return decode_record(encode_record(members["__entry__"].load()), self.info)


def url_list(path: str | Sequence[str]) -> list[str] | None:
    """Explicit shard URLs (list, ``pipe:``/http spec, or a brace pattern), else None."""
    if not isinstance(path, str | os.PathLike):
        return [str(p) for p in path]
    spec = str(path)
    if _is_url(spec) or (spec.endswith(".tar") and "{" in spec):
        from webdataset.shardlists import expand_urls

        return list(expand_urls(spec))
    return None


def read_info_next_to(url: str) -> dict:
    base = url.rsplit("/", 1)[0] if "/" in url else "."
    if url.startswith("pipe:"):
        raise ValueError(f"{url}: pass info=<dataset.json dict> with pipe: shard URLs")
    with _open_stream(f"{base}/dataset.json") as f:
        return json.loads(f.read().decode("utf-8"))


def shard_source(path: str | os.PathLike | Sequence[str], info: dict | None) -> ShardSource:
    urls = url_list(path)
    if urls is None:
        info = info or read_index(Path(path) / "dataset.json")
        shards = info.get("shards") or []
        urls = [str(Path(path) / s["name"]) for s in shards]
        for u in urls:
            if not os.path.isfile(u):
                raise FileNotFoundError(f"{u}: shard listed in dataset.json is missing")
    else:
        info = info or read_info_next_to(urls[0])
        shards = info.get("shards") or []
        by_name = {s["name"]: s for s in shards}
        missing = [u for u in urls if u.rsplit("/", 1)[-1] not in by_name]
        if missing:
            raise ValueError(f"{missing[0]}: shard not listed in dataset.json")
        shards = [by_name[u.rsplit("/", 1)[-1]] for u in urls]
    if not urls:
        raise ValueError(f"{path}: dataset.json lists no shards")
    return ShardSource(urls, [int(s["num_samples"]) for s in shards], info)


def read_index(index: Path) -> dict:
    """dataset.json as a dict; errors name the file."""
    try:
        return json.loads(index.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{index}: dataset.json not found") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{index}: not valid JSON ({exc})") from None
    except RecursionError:
        raise ValueError(f"{index}: JSON nested too deeply to be a dataset index") from None
