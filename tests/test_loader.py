"""Loader: shards and raw folders give the same samples, seeding, epochs, URLs and bad samples."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from clusterformer.data import LoaderSpec, build_loader, load_dataset_info
from clusterformer.data.errors import SampleError
from clusterformer.data.shapes import make_shapes
from clusterformer.data.shards import write_shards
from clusterformer.data.streams import open_raw

TASKS = ("classification", "instance", "panoptic", "semantic")


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("shapes")
    make_shapes(root / "raw", num_images=18, image_size=48, seed=3)
    out = {"raw": root / "raw"}
    for task in TASKS:
        out[task] = root / task
        write_shards(open_raw(root / "raw", task), out[task], samples_per_shard=5, seed=1)
    return out


def _by_key(loader) -> dict[str, dict]:
    """key -> {"image": ..., task fields} over one epoch (valid entries only)."""
    out = {}
    for batch in loader:
        for i, key in enumerate(batch["keys"]):
            if not batch["valid"][i]:
                continue
            h, w = batch["pixel_mask"][i].sum(0).max(), batch["pixel_mask"][i].sum(1).max()
            entry = {"image": batch["images"][i, :, :h, :w]}
            if "labels" in batch and "targets" not in batch:
                entry["label"] = batch["labels"][i]
            else:
                entry.update(batch["targets"][i])
            assert key not in out, f"{key} seen twice"
            out[key] = entry
    return out


@pytest.mark.parametrize("task", TASKS)
def test_shards_equal_raw_reading_in_eval(shapes: dict[str, Path], task: str) -> None:
    kwargs = {"batch_size": 4, "image_size": 40, "train": False}
    from_shards = _by_key(build_loader(shapes[task], task, LoaderSpec(**kwargs)))
    from_raw = _by_key(build_loader(shapes["raw"], task, LoaderSpec(**kwargs)))
    assert len(from_shards) == 18 and from_shards.keys() == from_raw.keys()
    for key, a in from_shards.items():
        b = from_raw[key]
        assert a.keys() == b.keys()
        for name, value in a.items():
            if torch.is_tensor(value):
                assert torch.equal(value, b[name]), (key, name)
            else:
                assert value == b[name], (key, name)
    if task != "classification":
        some = next(iter(from_shards.values()))
        assert some["orig_size"] == (48, 48) and some["size"] == (40, 40)


def test_batch_layout_for_dense_train(shapes: dict[str, Path]) -> None:
    loader = build_loader(shapes["panoptic"], "panoptic",
                          LoaderSpec(batch_size=3, image_size=32, train=True))
    assert len(loader) == 18 // 3
    batch = next(iter(loader))
    assert batch["images"].dtype == torch.float32 and batch["images"].shape[:2] == (3, 3)
    assert batch["pixel_mask"].dtype == torch.bool and batch["valid"].all()
    assert batch["images"].shape[-2] <= 32 and batch["images"].shape[-1] <= 32
    for i, t in enumerate(batch["targets"]):
        h, w = t["size"]
        assert batch["pixel_mask"][i, :h, :w].all() and batch["pixel_mask"][i].sum() == h * w
        assert t["masks"].shape[1:] == (h, w) and t["masks"].dtype == torch.bool
        n = t["masks"].shape[0]
        for name in ("labels", "isthing", "iscrowd", "boxes", "segment_ids"):
            assert t[name].shape[0] == n
        assert t["key"] == batch["keys"][i]


def test_same_seed_same_batches_other_epoch_other_order(shapes: dict[str, Path]) -> None:
    def run(seed: int, epoch: int, workers: int = 0) -> list[dict]:
        spec = LoaderSpec(batch_size=4, image_size=32, train=True, seed=seed,
                          num_workers=workers, shuffle_buffer=8)
        loader = build_loader(shapes["instance"], "instance", spec)
        loader.set_epoch(epoch)
        return list(loader)

    a, b = run(0, 0), run(0, 0)
    assert [x["keys"] for x in a] == [x["keys"] for x in b]
    assert all(torch.equal(x["images"], y["images"]) for x, y in zip(a, b, strict=True))
    assert [x["keys"] for x in run(0, 1)] != [x["keys"] for x in a]
    assert [x["keys"] for x in run(1, 0)] != [x["keys"] for x in a]
    w1, w2 = run(0, 0, workers=2), run(0, 0, workers=2)
    assert [x["keys"] for x in w1] == [x["keys"] for x in w2]
    assert all(torch.equal(x["images"], y["images"]) for x, y in zip(w1, w2, strict=True))


def test_explicit_urls_brace_pattern_and_pipe(shapes: dict[str, Path]) -> None:
    folder = shapes["semantic"]
    info = load_dataset_info(folder)
    names = [s["name"] for s in info["shards"]]
    expect = {k for b in build_loader(folder, "semantic", LoaderSpec(batch_size=8, image_size=24,
                                      train=False)) for k in b["keys"]}  # fmt: skip
    pattern = str(folder / f"shard-{{000000..{len(names) - 1:06d}}}.tar")
    file_urls = [f"file://{folder / n}" for n in names]
    pipes = [f"pipe:cat {folder / n}" for n in names]
    for path, extra in ((pattern, {}), (file_urls, {}), (pipes, {"info": info})):
        spec = LoaderSpec(batch_size=8, image_size=24, train=False)
        loader = build_loader(path, "semantic", spec, **extra)
        assert {k for b in loader for k in b["keys"]} == expect
    with pytest.raises(ValueError, match="pass info"):
        build_loader(pipes, "semantic", LoaderSpec(batch_size=8, image_size=24, train=False))


def test_raw_folder_info_and_task_format_checks(shapes: dict[str, Path]) -> None:
    assert load_dataset_info(shapes["raw"], "panoptic")["format"] == "coco-panoptic"
    assert load_dataset_info(shapes["raw"], "semantic")["num_samples"] == 18
    assert load_dataset_info(shapes["instance"])["num_samples"] == 18
    with pytest.raises(ValueError, match="several raw formats"):
        load_dataset_info(shapes["raw"])
    two = LoaderSpec(batch_size=2, image_size=32, train=True)
    with pytest.raises(ValueError, match="cannot be used for panoptic"):
        build_loader(shapes["instance"], "panoptic", two)
    with pytest.raises(ValueError, match="fewer than world_size x batch_size"):
        build_loader(shapes["instance"], "instance", replace(two, batch_size=19))
    with pytest.raises(ValueError, match="unknown task"):
        build_loader(shapes["instance"], "depth", two)
    with pytest.raises(FileNotFoundError, match="no such dataset folder"):
        build_loader(shapes["raw"] / "nope", "instance", two)


def test_loader_spec_checks_its_values_and_resolves_the_rank(shapes: dict[str, Path]) -> None:
    with pytest.raises(ValueError, match="batch_size must be at least 1"):
        LoaderSpec(batch_size=0, image_size=32, train=True)
    with pytest.raises(ValueError, match="on_error must be 'stop' or 'skip'"):
        LoaderSpec(batch_size=2, image_size=32, train=True, on_error="ignore")
    augment = {"flip": False}
    spec = LoaderSpec(batch_size=2, image_size=32, train=True, augment=augment,
                      normalisation={"mean": [0.5] * 3, "std": [0.25] * 3, "other": 1})
    augment["flip"] = True  # the spec holds its own copy
    assert spec.augment == {"flip": False}
    assert spec.normalisation == {"mean": (0.5,) * 3, "std": (0.25,) * 3}
    resolved = spec.resolved()  # no process group here: rank 0 of 1
    assert (resolved.rank, resolved.world_size, resolved.drop_last) == (0, 1, True)
    assert replace(spec, train=False).resolved().drop_last is False
    with pytest.raises(ValueError, match="rank 2 is outside world_size 2"):
        replace(spec, rank=2, world_size=2).resolved()
    record = {"resize": "square", "resize_to": 24, "crop": None, "mean": [0.5] * 3,
              "std": [0.25] * 3, "size": 24}  # fmt: skip
    evaluation = LoaderSpec(batch_size=2, image_size=32, train=False, preprocess=record)
    assert evaluation.preprocess.describe() == "24x24, no crop"  # the dict became the record
    batch = next(iter(build_loader(shapes["semantic"], "semantic", evaluation)))
    assert batch["images"].shape[-2:] == (24, 24)  # the record, not image_size, decides
    from clusterformer.data.loader import StreamDataset

    with pytest.raises(ValueError, match="resolved LoaderSpec"):
        StreamDataset(None, None, spec)


def test_bad_sample_stops_or_is_skipped_with_a_warning(
    shapes: dict[str, Path], tmp_path: Path
) -> None:
    folder = tmp_path / "sem"
    shutil.copytree(shapes["semantic"], folder)
    info = json.loads((folder / "dataset.json").read_text())
    info["shards"][0]["name"] = "broken.tar"
    (folder / "dataset.json").write_text(json.dumps(info))
    # The same shard with its first image cut short.
    with (
        tarfile.open(folder / "shard-000000.tar") as src,
        tarfile.open(folder / "broken.tar", "w") as out,
    ):
        cut = False
        for member in src.getmembers():
            data = src.extractfile(member).read()
            if member.name.endswith(".jpg") and not cut:
                data, cut = data[:40], True
            member.size = len(data)
            out.addfile(member, io.BytesIO(data))
    kwargs = {"batch_size": 4, "image_size": 24, "train": False}
    with pytest.raises(SampleError, match=r"broken\.tar \(sample "):
        list(build_loader(folder, "semantic", LoaderSpec(**kwargs)))
    loader = build_loader(folder, "semantic", LoaderSpec(on_error="skip", **kwargs))
    with pytest.warns(UserWarning, match="skipped bad sample"):
        batches = list(loader)
    assert len(batches) == len(loader)
    assert sum(int(b["valid"].sum()) for b in batches) == 17


SHARED = Path(__file__).resolve().parents[2] / "shared" / "datasets"


@pytest.mark.shared_data
@pytest.mark.parametrize(
    ("folder", "task"),
    [("coco_panoptic/panopticapi_sample", "panoptic"),
     ("ade_semantic/ade20k_sceneparsing_sample", "semantic")],
)  # fmt: skip
def test_real_samples_shards_equal_raw(tmp_path: Path, folder: str, task: str) -> None:
    raw = SHARED / folder
    if not raw.is_dir():
        pytest.skip(f"{raw} not present")
    write_shards(open_raw(raw, task), tmp_path / "shards", samples_per_shard=2)
    kwargs = {"batch_size": 2, "image_size": 64, "train": False}
    a = _by_key(build_loader(tmp_path / "shards", task, LoaderSpec(**kwargs)))
    b = _by_key(build_loader(raw, task, LoaderSpec(**kwargs)))
    assert a.keys() == b.keys() and len(a) == load_dataset_info(raw, task)["num_samples"]
    for key in a:
        for name, value in a[key].items():
            same = (
                torch.equal(value, b[key][name])
                if torch.is_tensor(value)
                else value == b[key][name]
            )
            assert same, (key, name)
