"""Hostile inputs (issue 21): names from data that lead out of their folder, damaged or
miscounted shards, deep JSON, and a --resume that changes the optimizer's settings.

Every case failed on the code before; nothing here writes outside ``tmp_path`` (the crafted
names point into a decoy folder inside it)."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

import pytest
import torch
from cli_runner import run_cf, train_argv
from fault_kit import cf, error_line
from hypothesis import given
from hypothesis import strategies as st

from clusterformer.data import LoaderSpec, build_loader
from clusterformer.data.paths import UnsafeNameError, check_name, join_inside, name_problem

# ----------------------------------------------------------------------------- the name rule


@pytest.mark.parametrize("name", ["../x", "../../x", "/abs/x", "a/../../x", "a//b", "a/", ".",
                                  "..", "", "a\x00b", "a\nb", "a\\b", "C:x", "x" * 2000])
def test_names_that_leave_their_folder_are_refused(name):
    assert name_problem(name) is not None
    with pytest.raises(UnsafeNameError):
        check_name(name, "sample key")


@pytest.mark.parametrize("name", ["000001", "a-b_c", "train2017/0001.jpg", "dir/sub/x", "...png",
                                  "naïve", "a b"])
def test_ordinary_names_pass(name, tmp_path):
    assert check_name(name) == name
    assert join_inside(tmp_path, name) == tmp_path / name


@given(st.text(max_size=40))
def test_a_name_that_passes_stays_inside(name):
    folder = Path("/tmp/cf-names-probe/out")  # resolve() only: nothing is created
    if name_problem(name) is None:
        path = join_inside(folder, name)
        assert folder.resolve() in path.resolve().parents
    else:
        with pytest.raises(UnsafeNameError):
            join_inside(folder, name)


def test_a_symbolic_link_inside_cannot_lead_out(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "out" / "link").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(UnsafeNameError, match="leads out"):
        join_inside(tmp_path / "out", "link/x.png")


# ----------------------------------------------------------------------------- crafted shards
def _members(tar_path: Path) -> list[tuple[str, bytes]]:
    with tarfile.open(tar_path) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar.getmembers() if m.isreg()]


def _write_tar(tar_path: Path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(tar_path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _rekey(shards: Path, out: Path, new_key: str, *, in_json: bool) -> Path:
    """A copy of ``shards`` whose first sample is renamed ``new_key``: in its JSON ``key``
    (``in_json``) or in its tar member names (the JSON's key removed)."""
    shutil.copytree(shards, out)
    first = out / "shard-000000.tar"
    members = _members(first)
    old_key = members[0][0].split(".", 1)[0]
    crafted = []
    for name, data in members:
        key, _, suffix = name.partition(".")
        if key == old_key:
            if suffix == "json":
                doc = json.loads(data)
                if in_json:
                    doc["key"] = new_key
                else:
                    doc.pop("key")
                data = json.dumps(doc).encode()
            if not in_json:
                name = f"{new_key}.{suffix}"
        crafted.append((name, data))
    _write_tar(first, crafted)
    return out


@pytest.fixture(scope="module")
def semantic_setup(fault_raw, tmp_path_factory):
    """ADE-style shards of the fault scenes and a 1-step semantic checkpoint on them."""
    from clusterformer.data.formats import open_source
    from clusterformer.data.shards import write_shards

    root = tmp_path_factory.mktemp("hostile-sem")
    shards = root / "sem"
    write_shards(open_source("ade20k", fault_raw / "images", masks=fault_raw / "semantic"),
                 shards, samples_per_shard=8)  # fmt: skip
    run = root / "run"
    assert run_cf(["train", "--task", "semantic", "--data", str(shards), "--out", str(run),
                   "--steps", "1", "--batch-size", "2", "--image-size", "32"]) == 0
    return shards, run


@pytest.mark.parametrize("in_json", [True, False], ids=["json-key", "member-name"])
def test_eval_refuses_a_key_that_leads_out(semantic_setup, tmp_path, capsys, in_json):
    shards, run = semantic_setup
    decoy = tmp_path / "decoy"
    decoy.mkdir()
    crafted = _rekey(shards, tmp_path / "crafted", "../../../decoy/escaped", in_json=in_json)
    out = tmp_path / "a" / "b" / "metrics.json"
    code, err = cf(["eval", "--ckpt", run, "--data", crafted, "--out", out], capsys)
    assert code == 1
    line = error_line(err)
    assert "sample key" in line and "'..' or '.' part" in line and "shard-000000.tar" in line
    assert list(decoy.iterdir()) == []
    assert not out.exists()


def test_eval_refuses_an_absolute_key(semantic_setup, tmp_path, capsys):
    shards, run = semantic_setup
    target = tmp_path / "decoy" / "abs"
    crafted = _rekey(shards, tmp_path / "crafted", str(target), in_json=True)
    code, err = cf(["eval", "--ckpt", run, "--data", crafted, "--out", tmp_path / "m.json"],
                   capsys)  # fmt: skip
    assert code == 1 and "absolute path" in error_line(err)
    assert not (tmp_path / "decoy").exists()


def test_on_error_skip_leaves_the_bad_key_out(semantic_setup, tmp_path):
    shards, _ = semantic_setup
    crafted = _rekey(shards, tmp_path / "crafted", "../escaped", in_json=True)
    loader = build_loader(crafted, "semantic", LoaderSpec(batch_size=4, image_size=32, train=False,
                          on_error="skip"))  # fmt: skip
    with pytest.warns(UserWarning, match="sample key"):
        keys = [k for batch in loader for k, ok in zip(batch["keys"], batch["valid"],
                                                        strict=True) if ok]  # fmt: skip
    assert len(keys) == 15 and "../escaped" not in keys


def test_evaluators_check_the_key_themselves(tmp_path):
    """A plugin loader that skips the check still cannot make the evaluators write outside."""
    from clusterformer.metrics.panoptic import PanopticEvaluator
    from clusterformer.metrics.semantic import SemanticEvaluator

    cats = [{"id": 1, "name": "a", "isthing": 0}, {"id": 2, "name": "b", "isthing": 1}]
    sem = SemanticEvaluator(cats, predictions_out=tmp_path / "sem")
    target = {"key": "../../escaped", "semantic": torch.zeros(4, 4, dtype=torch.long),
              "orig_size": (4, 4), "image_id": 1}  # fmt: skip
    batch = {"targets": [target], "valid": [True]}
    with pytest.raises(UnsafeNameError):
        sem.update([torch.zeros(4, 4, dtype=torch.long)], batch)
    pan = PanopticEvaluator(cats, predictions_out=tmp_path / "pan.json")
    target = {**target, "key": "/abs/escaped", "masks": torch.ones(1, 4, 4, dtype=torch.bool),
              "labels": torch.tensor([0]), "segment_ids": torch.tensor([1]),
              "iscrowd": torch.tensor([False])}  # fmt: skip
    pred = {"panoptic": torch.ones(4, 4, dtype=torch.long),
            "segments": [{"id": 1, "category_id": 0}]}  # fmt: skip
    with pytest.raises(UnsafeNameError):
        pan.update([pred], {"targets": [target], "valid": [True]})
    assert not list(tmp_path.rglob("*.png"))


def test_panoptic_predictions_cannot_read_outside_their_folder(tmp_path, capsys, fault_raw):
    made = json.loads((fault_raw / "panoptic.json").read_text())
    pred = tmp_path / "pred.json"
    shutil.copytree(fault_raw / "panoptic", tmp_path / "pred")
    made["annotations"][0]["file_name"] = "../../outside.png"
    pred.write_text(json.dumps(made))
    code, err = cf(["eval", "--task", "panoptic", "--predictions", pred, "--data", fault_raw],
                   capsys)  # fmt: skip
    assert code == 1 and "file_name" in error_line(err) and "'..'" in error_line(err)


def test_shard_dataset_refuses_file_names_outside_images(fault_raw, tmp_path, capsys):
    doc = json.loads((fault_raw / "instances.json").read_text())
    doc["images"][0]["file_name"] = "../../../../etc/hostname"
    ann = tmp_path / "instances.json"
    ann.write_text(json.dumps(doc))
    args = ["shard-dataset", "--format", "coco", "--images", fault_raw / "images",
            "--annotations", ann]  # fmt: skip
    code, err = cf([*args, "--out", tmp_path / "stop"], capsys)
    assert code == 1 and "file_name" in error_line(err) and "'..'" in error_line(err)
    code, _ = cf([*args, "--out", tmp_path / "skip", "--on-error", "skip"], capsys)
    info = json.loads((tmp_path / "skip" / "dataset.json").read_text())
    assert code == 0 and info["skipped"] == 1 and info["num_samples"] == len(doc["images"]) - 1


# ----------------------------------------------------------------------------- shard integrity
@pytest.mark.parametrize("which", [1, 2], ids=["next-sample", "later-sample"])
def test_a_shard_with_fewer_samples_than_its_index_stops_training(fault_shards, tmp_path,
                                                                  capsys, which):  # fmt: skip
    crafted = tmp_path / "shards"
    shutil.copytree(fault_shards, crafted)
    first = crafted / "shard-000000.tar"
    members = _members(first)
    keys = list(dict.fromkeys(name.split(".", 1)[0] for name, _ in members))  # tar order
    # A sample's members renamed to the first sample's key: two samples share one key (the
    # next one would read as one sample with doubled members, a later one as a repeat).
    _write_tar(first, [(name.replace(keys[which], keys[0]), data) for name, data in members])
    code, err = cf(train_argv(crafted, tmp_path / "run", 4), capsys)
    line = error_line(err)
    assert code == 1 and "shard-000000.tar" in line and "share" in line and "key" in line
    loader = build_loader(crafted, "classification", LoaderSpec(batch_size=4, image_size=32,
                                                                train=True, on_error="skip"))
    with pytest.warns(UserWarning, match="shard-000000.tar"):
        assert len([b for b in loader]) == len(loader)  # skipped, named, and training goes on


def test_an_index_that_miscounts_a_shard_is_named(fault_shards, tmp_path):
    crafted = tmp_path / "shards"
    shutil.copytree(fault_shards, crafted)
    info = json.loads((crafted / "dataset.json").read_text())
    info["shards"][1]["num_samples"] += 1
    info["num_samples"] += 1
    (crafted / "dataset.json").write_text(json.dumps(info))
    loader = build_loader(crafted, "classification",
                          LoaderSpec(batch_size=4, image_size=32, train=False))
    with pytest.raises(ValueError, match=r"shard-000001\.tar: holds 8 samples, dataset.json "
                                         r"lists 9"):  # fmt: skip
        list(loader)


@pytest.mark.parametrize("workers", [0, 2])
def test_a_truncated_shard_is_named(fault_shards, tmp_path, capsys, workers):
    crafted = tmp_path / "shards"
    shutil.copytree(fault_shards, crafted)
    tar = crafted / "shard-000001.tar"
    tar.write_bytes(tar.read_bytes()[: tar.stat().st_size // 2])
    code, err = cf(train_argv(crafted, tmp_path / "run", 8, "--num-workers", str(workers)),
                   capsys)  # fmt: skip
    line = error_line(err)
    assert code == 1 and "shard-000001.tar: unreadable tar" in line and "Caught" not in line


# ----------------------------------------------------------------------------- deep JSON
def _deep(n: int) -> str:
    return "[" * n + "]" * n


def test_deep_json_is_named_not_a_recursion_error(fault_raw, fault_shards, tmp_path, capsys):
    ann = tmp_path / "instances.json"
    ann.write_text(_deep(100_000))
    code, err = cf(["shard-dataset", "--format", "coco", "--images", fault_raw / "images",
                    "--annotations", ann, "--out", tmp_path / "out"], capsys)  # fmt: skip
    line = error_line(err)
    assert code == 1 and str(ann) in line and "nested too deeply" in line
    crafted = tmp_path / "shards"
    shutil.copytree(fault_shards, crafted)
    (crafted / "dataset.json").write_text(_deep(100_000))
    code, err = cf(train_argv(crafted, tmp_path / "run", 1), capsys)
    line = error_line(err)
    assert code == 1 and "dataset.json" in line and "RecursionError" not in line


# ----------------------------------------------------------------------------- --resume
def _lrs(run: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["lr"] for r in rows if r.get("split") == "train" and "lr" in r}


def test_resume_applies_and_records_a_changed_lr(fault_shards, fault_warm, tmp_path, capsys):
    run = tmp_path / "run"
    first = train_argv(fault_shards, run, 2, "--schedule", "constant", log_every=1)
    assert run_cf(first) == 0
    assert "resume_changes" not in json.loads((run / "config.json").read_text())["run"]
    capsys.readouterr()
    again = [a if a != "1e-3" else "5e-3" for a in train_argv(
        fault_shards, run, 4, "--schedule", "constant", "--resume", log_every=1)]  # fmt: skip
    assert run_cf(again) == 0
    err = capsys.readouterr().err
    assert "--resume: optim.lr 0.001 -> 0.005, applied from step 2" in err
    lrs = _lrs(run)
    assert lrs[2] == pytest.approx(1e-3) and lrs[3] == pytest.approx(5e-3) == lrs[4]
    recorded = json.loads((run / "config.json").read_text())
    assert recorded["optim"]["lr"] == 5e-3
    assert recorded["run"]["resume_changes"] == [
        {"step": 2, "changes": {"optim.lr": [1e-3, 5e-3], "schedule.steps": [2, 4]}}]


def test_train_on_error_skip_goes_past_a_damaged_shard(fault_shards, tmp_path, capsys):
    crafted = tmp_path / "shards"
    shutil.copytree(fault_shards, crafted)
    tar = crafted / "shard-000001.tar"
    tar.write_bytes(tar.read_bytes()[: tar.stat().st_size // 2])
    with pytest.warns(UserWarning, match=r"shard-000001\.tar: unreadable tar"):
        code, err = cf(train_argv(crafted, tmp_path / "run", 6, "--on-error", "skip"), capsys)
    assert code == 0, err
    code, err = cf(train_argv(crafted, tmp_path / "run2", 6, "--on-error", "maybe"), capsys)
    assert code == 2 and "--on-error" in error_line(err)


def test_an_inference_size_past_the_record_bounds_is_a_usage_error(fault_run, fault_raw,
                                                                    tmp_path, capsys):  # fmt: skip
    image = next((fault_raw / "images").iterdir())
    code, err = cf(["predict", "--ckpt", fault_run, image, "--out", tmp_path / "p",
                    "--image-size", "100000"], capsys)  # fmt: skip
    assert code == 2 and "--image-size 100000" in error_line(err)
