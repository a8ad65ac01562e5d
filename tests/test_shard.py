"""cf shard-dataset: all four formats through the CLI, round trip, determinism, crash safety."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pytest
import torch

from clusterformer.cli.app import main
from clusterformer.data import shards as shards_module
from clusterformer.data.formats import open_source
from clusterformer.data.records import decode_record
from clusterformer.data.shapes import make_shapes
from clusterformer.data.shards import write_shards

FORMAT_ARGS = {
    "coco": ["--images", "{r}/images", "--annotations", "{r}/instances.json"],
    "coco-panoptic": ["--images", "{r}/images", "--annotations", "{r}/panoptic.json", "--masks", "{r}/panoptic"],
    "ade20k": ["--images", "{r}/images", "--masks", "{r}/semantic"],
    "imagefolder": ["--images", "{r}/classes"],
}


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return Path(make_shapes(tmp_path_factory.mktemp("shapes") / "s", num_images=12, image_size=64)["root"])


def cf(args: list[str], capsys) -> tuple[int, str]:
    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as exc:
        code = exc.code or 0
    return code, capsys.readouterr().err


def shard(root: Path, fmt: str, out: Path, capsys, *extra: str) -> dict:
    args = [a.format(r=root) for a in FORMAT_ARGS[fmt]]
    code, err = cf(["shard-dataset", "--format", fmt, *args, "--out", out, *extra], capsys)
    assert code == 0, err
    return json.loads((out / "dataset.json").read_text())


def read_tars(out: Path) -> list[tuple[str, dict[str, bytes]]]:
    """(key, {suffix: bytes}) per sample, in tar order, straight from the tar files."""
    info = json.loads((out / "dataset.json").read_text())
    samples: list[tuple[str, dict[str, bytes]]] = []
    for entry in info["shards"]:
        with tarfile.open(out / entry["name"]) as tar:
            for member in tar.getmembers():
                key, suffix = member.name.split(".", 1)
                if not samples or samples[-1][0] != key:
                    samples.append((key, {}))
                samples[-1][1][suffix] = tar.extractfile(member).read()
    return samples


def _assert_same_sample(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name, value in a.items():
        if isinstance(value, torch.Tensor):
            assert value.dtype == b[name].dtype and torch.equal(value, b[name]), name
        else:
            assert value == b[name], name


@pytest.mark.parametrize("fmt", list(FORMAT_ARGS))
def test_round_trip_all_formats(root, tmp_path, capsys, fmt):
    out = tmp_path / "shards"
    info = shard(root, fmt, out, capsys, "--samples-per-shard", "5")
    for key in ("format", "categories", "num_samples", "skipped", "shards", "version", "source"):
        assert key in info
    assert info["format"] == fmt and info["num_samples"] == 12 and info["skipped"] == 0
    assert [s["num_samples"] for s in info["shards"]] == [5, 5, 2]
    assert sorted(p.name for p in out.iterdir()) == ["dataset.json", "shard-000000.tar",
                                                      "shard-000001.tar", "shard-000002.tar", "skipped.jsonl"]  # fmt: skip
    source = open_source(fmt, **{a[2:]: Path(b.format(r=root)) for a, b in zip(*[iter(FORMAT_ARGS[fmt])] * 2, strict=True)})
    raw_records = {r.key: r for r in source.records()}
    raw_samples = {s["key"]: s for s in source.samples()}
    tar_samples = read_tars(out)
    assert sorted(k for k, _ in tar_samples) == sorted(raw_records)
    for key, members in tar_samples:
        record = raw_records[key]
        assert members[record.image_ext] == Path(record.path).read_bytes()  # original bytes
        if fmt in ("coco-panoptic", "ade20k"):
            assert members["label.png"] == record.label_png
        _assert_same_sample(decode_record(members, info), raw_samples[key])
        # full member names work as well as webdataset's suffix keys
        _assert_same_sample(decode_record({f"{key}.{s}": v for s, v in members.items()}, info), raw_samples[key])


def test_same_seed_gives_identical_shards_and_seed_changes_order(root, tmp_path, capsys):
    a = shard(root, "coco", tmp_path / "a", capsys, "--seed", "3", "--samples-per-shard", "4")
    b = shard(root, "coco", tmp_path / "b", capsys, "--seed", "3", "--samples-per-shard", "4")
    assert a["shards"] == b["shards"]
    for entry in a["shards"]:
        assert (tmp_path / "a" / entry["name"]).read_bytes() == (tmp_path / "b" / entry["name"]).read_bytes()
    shard(root, "coco", tmp_path / "c", capsys, "--seed", "4", "--samples-per-shard", "4")
    keys = lambda d: [k for k, _ in read_tars(tmp_path / d)]  # noqa: E731
    assert keys("a") != keys("c") and sorted(keys("a")) == sorted(keys("c"))
    shard(root, "coco", tmp_path / "d", capsys, "--no-shuffle")
    assert keys("d") == sorted(keys("d"))


def test_max_shard_mb_splits_and_rerun_replaces_stale_output(root, tmp_path, capsys):
    out = tmp_path / "out"
    info = shard(root, "imagefolder", out, capsys, "--max-shard-mb", "0.01")
    assert len(info["shards"]) > 2 and sum(s["num_samples"] for s in info["shards"]) == 12
    for entry in info["shards"][:-1]:
        assert (out / entry["name"]).stat().st_size <= 0.01 * 1024 * 1024 or entry["num_samples"] == 1
    (out / "notes.txt").write_text("user file")
    info = shard(root, "imagefolder", out, capsys)
    assert len(info["shards"]) == 1
    assert sorted(p.name for p in out.iterdir()) == ["dataset.json", "notes.txt", "shard-000000.tar", "skipped.jsonl"]


def _whole_looking(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir() if p.name == "dataset.json" or p.name.endswith(".tar"))


def test_crash_after_first_shard_keeps_the_previous_dataset(root, tmp_path, monkeypatch):
    out = tmp_path / "out"
    source = open_source("imagefolder", root / "classes")
    write_shards(source, out, samples_per_shard=3)  # a previous, complete run
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    real_encode, calls = shards_module.encode_record, []

    def crashing(record):
        calls.append(record.key)
        if len(calls) == 5:  # the first shard (3 samples) is already closed
            raise RuntimeError("simulated crash")
        return real_encode(record)

    monkeypatch.setattr(shards_module, "encode_record", crashing)
    with pytest.raises(RuntimeError, match="simulated crash"):
        write_shards(source, out, samples_per_shard=3)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # untouched, no temporaries


def test_nothing_whole_appears_before_the_end(root, tmp_path):
    """A hard kill (no cleanup) at any point leaves only temporary names behind."""
    out = tmp_path / "out"
    seen: list[list[str]] = []
    source = open_source("coco", root / "images", annotations=root / "instances.json")
    write_shards(source, out, samples_per_shard=2, progress=lambda n: seen.append(_whole_looking(out)))
    assert len(seen) == 12 and all(names == [] for names in seen)
    assert len(_whole_looking(out)) == 7  # 6 shards + dataset.json once finished


def test_cli_errors_are_one_line(root, tmp_path, capsys):
    code, err = cf(["shard-dataset", "--format", "coco", "--images", root / "images", "--out", tmp_path], capsys)
    assert code != 0 and err.strip() == "cf: error: --format coco needs --annotations"
    code, err = cf(["shard-dataset", "--format", "coco", "--images", tmp_path / "nope",
                    "--annotations", root / "instances.json", "--out", tmp_path / "o"], capsys)  # fmt: skip
    assert code != 0 and err.strip() == f"cf: error: {tmp_path / 'nope'}: images folder not found"


SHARED = Path(__file__).resolve().parents[2] / "shared" / "datasets"


@pytest.mark.shared_data
@pytest.mark.skipif(not SHARED.is_dir(), reason="needs ../shared/datasets")
def test_real_samples_round_trip(tmp_path):
    """Real COCO panoptic and ADE20K files: shards decode to exactly what the raw reader gives."""
    pan = SHARED / "coco_panoptic" / "panopticapi_sample"
    ade = SHARED / "ade_semantic" / "ade20k_sceneparsing_sample"
    sources = [
        open_source("coco-panoptic", pan / "images", annotations=pan / "annotations" / "panoptic.json",
                    masks=pan / "panoptic"),
        open_source("ade20k", ade / "images", masks=ade / "annotations"),
    ]  # fmt: skip
    for i, source in enumerate(sources):
        info = write_shards(source, tmp_path / str(i))
        raw = {s["key"]: s for s in source.samples()}
        decoded = [decode_record(m, info) for _, m in read_tars(tmp_path / str(i))]
        assert len(decoded) == len(raw) == info["num_samples"] > 0
        for sample in decoded:
            _assert_same_sample(sample, raw[sample["key"]])
