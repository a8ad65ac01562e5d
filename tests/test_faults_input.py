"""The fault matrix of issue 14, hostile and broken input (the runs are in test_faults.py):

2. no file a command or public loader accepts runs code: a malicious pickle in each kind
4. duplicate COCO image ids, 5. NaN / infinity anywhere in an annotation: one line or a
   counted skip, never a silent mix-up or a crash inside ``cf train``
7. a failed re-shard (bad sample, full disk) leaves the dataset in ``--out`` as it was
9. every error line names the file (and sample) and the fix, under 300 characters
10. exit code 2 for every flag error, 1 for data and runtime errors
"""

from __future__ import annotations

import io
import json
import shutil
import tarfile
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from cli_runner import train_argv
from fault_kit import (
    DISKS,
    Payload,
    cf,
    dotfiles,
    error_line,
    evil_torch_file,
    small_disk,
    snapshot,
)

from clusterformer.data import LoaderSpec, build_loader
from clusterformer.data import shards as shards_module
from clusterformer.export import read_export_metadata


def _copy(source: Path, to: Path) -> Path:
    return Path(shutil.copytree(source, to, symlinks=True))


# ----------------------------------------------------------------------------- 2. pickles
@pytest.fixture(scope="module")
def evil_pt2(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A real torch.export archive with our metadata whose first weight is a pickle that
    creates ``marker`` when ``torch.export.load`` unpickles it."""
    root = tmp_path_factory.mktemp("pt2")
    marker = root / "pwned"
    program = torch.export.export(torch.nn.Linear(2, 2), (torch.randn(1, 2),))
    good = root / "good.pt2"
    meta = {"format": "clusterformer-export-v1", "task": "classification"}
    torch.export.save(program, str(good), extra_files={"clusterformer.json": json.dumps(meta)})
    payload = io.BytesIO()
    torch.save(Payload(marker), payload)
    evil = root / "evil.pt2"
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(evil, "w") as dst:
        config_name = next(n for n in src.namelist() if n.endswith("model_weights_config.json"))
        config = json.loads(src.read(config_name))
        first = next(iter(config["config"].values()))
        first["use_pickle"] = True
        weight = config_name.rsplit("/", 1)[0] + "/" + first["path_name"]
        for info in src.infolist():
            data = src.read(info)
            if info.filename == config_name:
                data = json.dumps(config).encode()
            elif info.filename == weight:
                data = payload.getvalue()
            dst.writestr(info, data)
    return evil, marker


def test_pt2_metadata_is_read_without_unpickling(evil_pt2: tuple[Path, Path]) -> None:
    evil, marker = evil_pt2
    assert read_export_metadata(evil)["task"] == "classification"
    assert not marker.exists()


def _pickle_as(path: Path, marker: Path) -> Path:
    return evil_torch_file(path, marker)


def _hostile_files(run: Path, shards: Path, tmp: Path, marker: Path) -> dict[str, tuple]:
    """Per accepted file kind: the command that reads a malicious pickle of that kind."""
    resumed = _copy(run, tmp / "resumed")
    for state in (resumed / "checkpoints").glob("step-*/state.pt"):
        _pickle_as(state, marker)
    weights = _pickle_as(tmp / "evil.safetensors", marker)
    predictions = _pickle_as(tmp / "evil.json", marker)
    data = _copy(shards, tmp / "evil-shards")
    _pickle_as(data / "dataset.json", marker)
    image = _pickle_as(tmp / "evil.jpg", marker)
    return {  # kind: (argv, the file the error line must name)
        "state.pt": (train_argv(shards, resumed, 4, "--resume"), "step-000002/state.pt"),
        "safetensors (eval)": (["eval", "--ckpt", weights, "--data", shards], weights),
        "safetensors (predict)": (["predict", "--ckpt", weights, image, "--out", tmp / "p"],
                                  weights),
        "safetensors (export)": (["export", "--ckpt", weights, "--format", "pt2",
                                  "--out", tmp / "e.pt2"], weights),
        "safetensors (--pretrained)": (train_argv(shards, tmp / "new", 1, "--pretrained",
                                                  weights), weights),
        "predictions json": (["eval", "--task", "classification", "--predictions", predictions,
                              "--data", shards], predictions),
        "dataset.json": (["eval", "--ckpt", run, "--data", data], data / "dataset.json"),
        "image": (["predict", "--ckpt", run, image, "--out", tmp / "p2"], image),
    }  # fmt: skip


KINDS = ["state.pt", "safetensors (eval)", "safetensors (predict)",
         "safetensors (export)", "safetensors (--pretrained)", "predictions json",
         "dataset.json", "image"]  # fmt: skip


@pytest.mark.parametrize("kind", KINDS)
def test_a_malicious_pickle_in_any_accepted_file_runs_nothing(
    fault_run: Path, fault_shards: Path, tmp_path: Path, capsys: pytest.CaptureFixture, kind: str
) -> None:
    marker = tmp_path / "pwned"
    argv, named = _hostile_files(fault_run, fault_shards, tmp_path, marker)[kind]
    code, err = cf(argv, capsys)
    line = error_line(err)
    assert code == 1 and not marker.exists() and str(named) in line, line
    assert "weights_only" not in line  # never advise the unsafe load


def test_shards_with_pickle_members_load_without_unpickling(
    fault_shards: Path, tmp_path: Path
) -> None:
    marker = tmp_path / "pwned"
    data = _copy(fault_shards, tmp_path / "shards")
    payload = io.BytesIO()
    torch.save(Payload(marker), payload)
    for tar_path in data.glob("shard-*.tar"):
        members = []
        with tarfile.open(tar_path) as tar:
            for info in tar.getmembers():
                members.append((info, tar.extractfile(info).read()))
        with tarfile.open(tar_path, "w") as tar:
            for info, blob in members:
                tar.addfile(info, io.BytesIO(blob))
                key, _, kind = info.name.partition(".")
                if kind != "json":  # once per sample: two members of one suffix are refused
                    continue
                for suffix in ("pyd", "pickle", "pth"):  # webdataset's auto-decoded kinds
                    extra = tarfile.TarInfo(f"{key}.{suffix}")
                    extra.size = len(payload.getvalue())
                    tar.addfile(extra, io.BytesIO(payload.getvalue()))
    batches = list(build_loader(str(data), "classification", LoaderSpec(batch_size=4, image_size=32,
                                train=False)))  # fmt: skip
    assert sum(len(b["keys"]) for b in batches) == 16 and not marker.exists()


# ----------------------------------------------------------------------------- 4, 5. records
def _edit(root: Path, name: str, edit: Callable[[dict], object]) -> None:
    data = json.loads((root / name).read_text())
    edit(data)
    (root / name).write_text(json.dumps(data))  # json writes NaN / Infinity as given


def _first_ann(data: dict, image_id: int, key: str = "annotations") -> dict:
    return next(a for a in data[key] if a["image_id"] == image_id)


def _same_id(data: dict) -> None:  # image 2 takes image 1's id; its annotations go with it
    for ann in data["annotations"]:
        if ann["image_id"] == 2:
            ann["image_id"] = 1
    next(im for im in data["images"] if im["id"] == 2)["id"] = 1


RECORDS = {  # case: (format, file, edit, skipped samples, words in the line)
    "duplicate image id": ("coco", "instances.json", _same_id, 2, ["image id 1", "unique"]),
    "NaN bbox": ("coco", "instances.json",
                 lambda d: _first_ann(d, 2).update(bbox=[float("nan"), 1.0, 2.0, 3.0]), 1,
                 ["bbox[0] is nan"]),
    "infinite polygon": ("coco", "instances.json",
                         lambda d: _first_ann(d, 2)["segmentation"][0].__setitem__(3, float("inf")),
                         1, ["segmentation[0][3] is inf"]),
    "NaN area": ("coco", "instances.json", lambda d: _first_ann(d, 2).update(area=float("nan")),
                 1, ["area is nan"]),
    "NaN image width": ("coco", "instances.json",
                        lambda d: d["images"][1].update(width=float("nan")), 1, ["width is nan"]),
    "NaN segment bbox": ("coco-panoptic", "panoptic.json",
                         lambda d: _first_ann(d, 2)["segments_info"][0].update(
                             bbox=[0.0, float("-inf"), 1.0, 1.0]), 1, ["bbox[1] is -inf"]),
    "duplicate panoptic image id": ("coco-panoptic", "panoptic.json",
                                    lambda d: (d["images"][1].update(id=1),
                                               _first_ann(d, 2).update(image_id=1)), 2,
                                    ["image id 1"]),
}  # fmt: skip
ARGS = {
    "coco": ["--images", "{r}/images", "--annotations", "{r}/instances.json"],
    "coco-panoptic": ["--images", "{r}/images", "--annotations", "{r}/panoptic.json",
                      "--masks", "{r}/panoptic"],  # fmt: skip
}


def _shard_argv(root: Path, fmt: str, out: Path, *extra: str) -> list[str]:
    return ["shard-dataset", "--format", fmt, *(a.format(r=root) for a in ARGS[fmt]),
            "--out", str(out), *extra]  # fmt: skip


@pytest.mark.parametrize("case", list(RECORDS))
def test_bad_records_stop_with_one_line_or_are_counted(
    fault_raw: Path, tmp_path: Path, capsys: pytest.CaptureFixture, case: str
) -> None:
    fmt, name, edit, skipped, words = RECORDS[case]
    root = _copy(fault_raw, tmp_path / "raw")
    _edit(root, name, edit)
    code, err = cf(_shard_argv(root, fmt, tmp_path / "stop"), capsys)
    line = error_line(err)
    assert code == 1 and "(sample 000001)" in line and all(w in line for w in words), line
    assert not (tmp_path / "stop" / "dataset.json").exists()
    code, err = cf(_shard_argv(root, fmt, tmp_path / "skip", "--on-error", "skip"), capsys)
    assert code == 0, err
    info = json.loads((tmp_path / "skip" / "dataset.json").read_text())
    assert info["skipped"] == skipped and info["num_samples"] == 16 - skipped


# ----------------------------------------------------------------------------- 7. re-shard
def _corrupt_image(root: Path) -> None:
    path = root / "classes" / "circle" / "000000.jpg"
    path.write_bytes(path.read_bytes()[:200])


def test_a_failed_reshard_keeps_the_dataset_in_out(
    fault_raw: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    root = _copy(fault_raw, tmp_path / "raw")
    out = tmp_path / "out"
    argv = ["shard-dataset", "--format", "imagefolder", "--images", root / "classes", "--out", out]
    assert cf(argv, capsys)[0] == 0
    before = snapshot(out)
    _corrupt_image(root)
    code, err = cf([*argv, "--samples-per-shard", "4"], capsys)
    assert code == 1 and "000000.jpg" in error_line(err)
    assert snapshot(out) == before and dotfiles(out) == []


@pytest.mark.parametrize("kind", DISKS)
def test_a_reshard_onto_a_full_disk_keeps_the_dataset_in_out(
    fault_raw: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
    monkeypatch: pytest.MonkeyPatch, kind: str,
) -> None:  # fmt: skip
    with small_disk(tmp_path / "disk", "96k", kind, monkeypatch) as disk:
        out = disk / "out"
        assert cf(["shard-dataset", "--format", "imagefolder", "--images", fault_raw / "classes",
                   "--out", out, "--samples-per-shard", "4"], capsys)[0] == 0  # fmt: skip
        before = snapshot(out)
        if kind == "fake":  # tar writes bypass os.write: fail the shard writer itself
            def full(self, key, members):  # noqa: ANN001, ANN202
                raise OSError(28, "No space left on device")

            monkeypatch.setattr(shards_module._ShardTar, "add", full)
        else:  # fill the disk, leaving less than a second copy needs
            room = shutil.disk_usage(disk).free - sum(map(len, before.values())) // 2
            (disk / "filler").write_bytes(b"\0" * max(room, 0))
        code, err = cf(["shard-dataset", "--format", "coco", "--images", fault_raw / "images",
                        "--annotations", fault_raw / "instances.json", "--out", out],
                       capsys)  # fmt: skip
        line = error_line(err)
        assert code == 1 and f"{out}: no space left" in line, line
        assert snapshot(out) == before and dotfiles(out) == []


# ----------------------------------------------------------------------------- 9. messages
def _run_with(tmp: Path, run: Path, shards: Path, raw: Path, case: str) -> tuple[list, list[str]]:
    """Per case: argv of a command that fails, and what its line must say."""
    root = _copy(raw, tmp / "raw")
    if case == "image without id":
        _edit(root, "instances.json", lambda d: d["images"][3].pop("id"))
        return _shard_argv(root, "coco", tmp / "o"), [str(root / "instances.json"), "no id"]
    if case == "segment without id":
        _edit(root, "panoptic.json", lambda d: _first_ann(d, 2)["segments_info"][0].pop("id"))
        return (_shard_argv(root, "coco-panoptic", tmp / "o"),
                [str(root / "panoptic" / "000001.png"), "(sample 000001)", "no integer id"])
    if case == "category id abc":
        _edit(root, "instances.json", lambda d: _first_ann(d, 2).update(category_id="abc"))
        return _shard_argv(root, "coco", tmp / "o"), ["(sample 000001)", "unknown category id abc"]
    if case == "panoptic json as coco":
        argv = _shard_argv(root, "coco", tmp / "o")
        argv[argv.index(str(root / "instances.json"))] = str(root / "panoptic.json")
        return argv, [str(root / "panoptic.json"), "--format coco-panoptic"]
    if case in ("truncated safetensors (eval)", "truncated safetensors (predict)"):
        bad = tmp / "cut.safetensors"
        bad.write_bytes((run / "checkpoints" / "last.safetensors").read_bytes()[:1000])
        if "eval" in case:
            return ["eval", "--ckpt", bad, "--data", shards], [str(bad), "re-copy"]
        image = raw / "classes" / "circle" / "000000.jpg"
        return ["predict", "--ckpt", bad, image, "--out", tmp / "p"], [str(bad), "re-copy"]
    if case == "resume with another preset":
        resumed = _copy(run, tmp / "run")
        argv = train_argv(shards, resumed, 4, "--resume", "--model", "clusterformer-tiny")
        return argv, ["clusterformer-nano", "clusterformer-tiny", "--restart"]
    if case == "state with python objects":
        resumed = _copy(run, tmp / "run")
        for state in (resumed / "checkpoints").glob("step-*/state.pt"):
            evil_torch_file(state, tmp / "pwned")
        return train_argv(shards, resumed, 4, "--resume"), ["state.pt", "--restart"]
    if case == "garbage image":
        bad = tmp / "garbage.jpg"
        bad.write_bytes(b"this is not a jpeg")
        return ["predict", "--ckpt", run, bad, "--out", tmp / "p"], [str(bad), "cannot decode"]
    if case == "other classes":
        data = _copy(shards, tmp / "data")
        info = json.loads((data / "dataset.json").read_text())
        info["categories"] += [dict(info["categories"][0], id=9, name="extra", train_id=4)]
        (data / "dataset.json").write_text(json.dumps(info))
        return ["eval", "--ckpt", run, "--data", data], [str(data), "5 classes", "checkpoint 4"]
    if case == "empty folder":
        (tmp / "empty").mkdir()
        return ["predict", "--ckpt", run, tmp / "empty", "--out", tmp / "p"], [str(tmp / "empty")]
    raise AssertionError(case)


MESSAGES = ["image without id", "segment without id", "category id abc", "panoptic json as coco",
            "truncated safetensors (eval)", "truncated safetensors (predict)",
            "resume with another preset", "state with python objects", "garbage image",
            "other classes", "empty folder"]  # fmt: skip


@pytest.mark.parametrize("case", MESSAGES)
def test_error_lines_name_the_file_and_the_fix(
    fault_run: Path, fault_shards: Path, fault_raw: Path, tmp_path: Path,
    capsys: pytest.CaptureFixture, case: str,
) -> None:  # fmt: skip
    argv, words = _run_with(tmp_path, fault_run, fault_shards, fault_raw, case)
    code, err = cf(argv, capsys)
    line = error_line(err)
    assert code == 1 and all(w in line for w in words), line
    for noise in ("KeyError", "SafetensorError", "BytesIO", "weights_only", "Error(s) in"):
        assert noise not in line, line


def test_predict_expands_a_folder(
    fault_run: Path, fault_raw: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    folder = fault_raw / "classes" / "circle"
    code, err = cf(["predict", "--ckpt", fault_run, folder, "--out", tmp_path / "p"], capsys)
    assert code == 0, err
    records = json.loads((tmp_path / "p" / "predictions.json").read_text())
    assert len(records) == len(list(folder.glob("*.jpg"))) > 0


# ----------------------------------------------------------------------------- 10. exit codes
FLAG_ERRORS = [
    ["train", "--task", "classification", "--data", "{d}", "--out", "{t}/r", "--steps", "0"],
    ["train", "--task", "classification", "--data", "{d}", "--out", "{t}/r", "--steps", "2",
     "--lr", "-1"],
    ["train", "--task", "classification", "--data", "{d}", "--out", "{t}/r", "--steps", "2",
     "--batch-size", "0"],
    ["train", "--task", "classification", "--data", "{d}", "--out", "{t}/r", "--steps", "2",
     "--recipe", "nope"],
    ["train", "--task", "classification", "--data", "{d}", "--out", "{t}/r", "--steps", "2",
     "--resume", "--restart"],
    ["train", "--task", "nope", "--data", "{d}", "--out", "{t}/r", "--steps", "2"],
    ["train", "--task", "classification", "--data", "{d}", "--out", "{t}/r", "--steps", "abc"],
    ["train", "--task", "classification", "--data", "{d}"],
    ["shard-dataset", "--format", "coco", "--images", "{t}", "--out", "{t}/o"],
    ["shard-dataset", "--format", "imagefolder", "--images", "{t}", "--masks", "{t}",
     "--out", "{t}/o"],
    ["shard-dataset", "--format", "nope", "--images", "{t}", "--out", "{t}/o"],
    ["eval", "--data", "{d}", "--ckpt", "{t}", "--batch-size", "0"],
    ["predict", "--ckpt", "{t}", "{t}", "--out", "{t}/p", "--score-threshold", "2"],
    ["export", "--ckpt", "{t}", "--format", "nope", "--out", "{t}/x.onnx"],
]  # fmt: skip


@pytest.mark.parametrize("argv", FLAG_ERRORS, ids=lambda a: " ".join(a[:1] + a[-2:]))
def test_every_flag_error_exits_2_with_one_line(
    fault_shards: Path, tmp_path: Path, capsys: pytest.CaptureFixture, argv: list[str]
) -> None:
    code, err = cf([a.format(d=fault_shards, t=tmp_path) for a in argv], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert err.startswith("cf: error: ") and len(err.strip()) < 300, err


def test_bad_data_exits_1(fault_raw: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "bad.json").write_text("{ not json")
    code, err = cf(["shard-dataset", "--format", "coco", "--images", fault_raw / "images",
                    "--annotations", tmp_path / "bad.json", "--out", tmp_path / "o"],
                   capsys)  # fmt: skip
    assert code == 1 and str(tmp_path / "bad.json") in error_line(err)
