"""Issue 21, hostile inputs to ``cf predict``: no input is ever written over (``--out`` may be
the input folder) and distinct inputs get distinct outputs, whatever their names.

The naming rule is a pure function (``predict_outputs.output_names``), tested here directly
and with hypothesis; a few cases run end to end on the fault tests' tiny classifier."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

import pytest
from fault_kit import cf, error_line
from hypothesis import given
from hypothesis import strategies as st

from clusterformer.cli.errors import UserError
from clusterformer.cli.predict_cmd import plan_output_names
from clusterformer.cli.predict_outputs import (
    COMBINED,
    entry_in,
    fold,
    output_entries,
    output_names,
)
from clusterformer.data.video import is_video

OUT = Path("/data/out")
ELSEWHERE = Path("/data/photos")


def _names(files: list[str], folder: Path = ELSEWHERE, **kwargs: object) -> list[str]:
    images = [folder / f for f in files]
    return output_names(images, OUT, images, **kwargs)


# ----------------------------------------------------------------------------- the rule
def test_same_stems_take_the_next_free_suffix() -> None:
    assert _names(["a.jpg", "a.png", "a-1.jpg", "a.jpg"]) == ["a", "a-2", "a-1", "a-3"]
    assert _names(["a.jpg", "A.jpg", "a-2.jpg"]) == ["a", "A-2", "a-2-2"]


def test_combined_records_names_are_never_an_inputs() -> None:
    assert _names(["predictions.jpg", "Predictions.png"]) == ["predictions-2", "Predictions-3"]
    assert _names(["records.jpg"], reserved=[*COMBINED, "records.json"]) == ["records-2"]


def test_inputs_in_out_keep_their_names() -> None:
    # a.png in OUT is an input: a.jpg's overlay may not take its name, nor its own overlay.
    assert _names(["a.jpg", "a.png", "b.json", "c.png.jpg"], folder=OUT) == [
        "a-2", "a-3", "b-2", "c.png"]  # fmt: skip
    # Outside OUT the same names are free.
    assert _names(["a.jpg", "a.png", "b.json"]) == ["a", "a-2", "b"]


def test_video_folders_avoid_inputs_beneath_them() -> None:
    images = [OUT / "clip" / "000000.png", ELSEWHERE / "clip.mp4", ELSEWHERE / "clip.jpg"]
    assert output_names(images, OUT, images) == ["000000", "clip-2", "clip"]
    # A video's frame folder can take the name of an image's overlay ...
    assert _names(["x.png.mp4", "x.jpg"]) == ["x.png", "x-2"]
    # ... and "." or ".." would be OUT itself or the folder above it.
    assert _names([".mp4", "..mp4", "...mp4"]) == [".mp4", ".-2", "..-2"]


# Small alphabets so that names collide often: case, "-2" endings, dots, reserved names.
STEMS = st.one_of(st.sampled_from(["a", "A", "a-2", "A-3", "predictions", "PREDICTIONS",
                                   "x.png", "clip", "Straße", "strasse"]),  # fmt: skip
                  st.text(alphabet="aA-2.", min_size=1, max_size=4))
SUFFIXES = st.sampled_from([".jpg", ".JPG", ".png", ".json", ".jsonl", ".mp4", ".MOV"])
FOLDERS = st.sampled_from([OUT, ELSEWHERE, OUT / "clip", OUT / "A", ELSEWHERE / "a"])


@given(files=st.lists(st.tuples(FOLDERS, STEMS, SUFFIXES), max_size=12),
       extra=st.lists(st.sampled_from(["a.png", "A-2.json", "clip", "x.json"]), max_size=2))
def test_output_names_never_collide(files: list[tuple[Path, str, str]], extra: list[str]) -> None:
    images = [folder / f"{stem}{suffix}" for folder, stem, suffix in files]
    reserved = [*COMBINED, *extra]
    names = output_names(images, OUT, images, reserved)
    assert len(names) == len(images)
    assert output_names(images, OUT, images, reserved) == names  # deterministic
    # In input order: a later input never changes an earlier one's name.
    assert output_names(images[:-1], OUT, images, reserved) == names[:-1]

    fixed = {fold(r) for r in reserved}
    fixed |= {e for path in images if (e := entry_in(OUT, path)) is not None}
    used: set[str] = set()
    for image, name in zip(images, names, strict=True):
        video = is_video(image)
        assert re.fullmatch(rf"{re.escape(image.stem)}(-[2-9]|-[1-9]\d+)?", name), name
        entries = {fold(e) for e in output_entries(name, video)}
        assert entries.isdisjoint(fixed | {".", ".."}), (image, name)
        assert entries.isdisjoint(used), (image, name)
        # The first free one: every smaller suffix was taken when this input was named.
        k = int(name.rsplit("-", 1)[1]) if name != image.stem else 1
        for smaller in range(1, k):
            candidate = image.stem if smaller == 1 else f"{image.stem}-{smaller}"
            taken = {fold(e) for e in output_entries(candidate, video)}
            assert not taken.isdisjoint(fixed | used | {".", ".."}), (image, candidate)
        used |= entries


# ----------------------------------------------------------------------------- the files
def test_plan_refuses_records_over_an_input(tmp_path: Path) -> None:
    image = tmp_path / "x.jpg"
    image.write_bytes(b"")
    with pytest.raises(UserError, match="--jsonl is one of the input files"):
        plan_output_names([image], tmp_path / "o", tmp_path / "." / "x.jpg")
    records = tmp_path / "predictions.json"
    records.write_bytes(b"")
    with pytest.raises(UserError, match="predictions.json: an input file"):
        plan_output_names([records], tmp_path, None)


def test_plan_avoids_links_in_out_to_inputs(tmp_path: Path) -> None:
    photos, out = tmp_path / "photos", tmp_path / "out"
    (photos / "frames").mkdir(parents=True)
    out.mkdir()
    for name in ("a.png", "frames/000000.png", "clip.mp4", "a.jpg", "b.jpg", "c.png"):
        (photos / name).write_bytes(b"")
    (out / "a.png").symlink_to(photos / "a.png")
    (out / "clip").symlink_to(photos / "frames")  # frames written here would land in photos
    (out / "b.png").symlink_to(tmp_path / "nowhere")
    (out / "c.png").symlink_to(photos / "c.png")  # no input: replaced, as any file in OUT
    (out / "loop").symlink_to(out / "loop")
    images = [photos / "a.jpg", photos / "clip.mp4", photos / "b.jpg", photos / "c.jpg",
              photos / "frames" / "000000.png", photos / "a.png"]  # fmt: skip
    assert plan_output_names(images, out, None) == ["a-2", "clip-2", "b", "c", "000000", "a-3"]
    # An input that is a link in OUT is the user's file too (as given, not only its target).
    assert plan_output_names([out / "a.png", photos / "a.jpg"], out, None) == ["a-2", "a-3"]


def _digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir()}


def _photos(fault_raw: Path, folder: Path, names: list[str]) -> None:
    from PIL import Image

    folder.mkdir()
    sources = sorted((fault_raw / "classes").rglob("*.jpg"))
    for name, source in zip(names, sources, strict=False):
        if name.endswith(".png"):
            Image.open(source).save(folder / name)
        else:
            shutil.copyfile(source, folder / name)


def test_predict_into_the_input_folder_replaces_nothing(
    fault_run: Path, fault_raw: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    folder = tmp_path / "photos"
    _photos(fault_raw, folder, ["a.jpg", "a.png", "a-1.jpg", "predictions.jpg"])
    expected = {"a.jpg": "a-2", "a.png": "a-3", "a-1.jpg": "a-1",
                "predictions.jpg": "predictions-2"}  # fmt: skip
    if not (folder / "A.jpg").exists():  # a case-sensitive file system: A.jpg is another file
        shutil.copyfile(folder / "a-1.jpg", folder / "A.jpg")
        expected |= {"A.jpg": "A-2", "a.jpg": "a-3", "a.png": "a-4"}
    before = _digests(folder)

    code, err = cf(["predict", "--ckpt", fault_run, folder, "--out", folder], capsys)
    assert code == 0, err

    after = _digests(folder)
    assert {name: after[name] for name in before} == before  # every input byte for byte
    made = {f"{n}.{kind}" for n in expected.values() for kind in ("png", "json")}
    assert set(after) - set(before) == made | {"predictions.json"}
    for source, name in expected.items():
        assert json.loads((folder / f"{name}.json").read_text())["image"] == str(folder / source)
        assert (folder / f"{name}.png").read_bytes().startswith(b"\x89PNG")
    records = json.loads((folder / "predictions.json").read_text())
    assert sorted(r["image"] for r in records) == sorted(str(folder / s) for s in expected)


def test_each_input_gets_its_own_outputs(
    fault_run: Path, fault_raw: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    folder, out = tmp_path / "photos", tmp_path / "out"
    _photos(fault_raw, folder, ["a.jpg", "predictions.jpg"])
    a, named = folder / "a.jpg", folder / "predictions.jpg"
    code, err = cf(["predict", "--ckpt", fault_run, a, a, named, "--out", out, "--workers", "0"],
                   capsys)  # fmt: skip
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == [
        "a-2.json", "a-2.png", "a.json", "a.png", "predictions-2.json", "predictions-2.png",
        "predictions.json"]  # fmt: skip
    assert json.loads((out / "predictions-2.json").read_text())["image"] == str(named)
    records = json.loads((out / "predictions.json").read_text())
    assert [r["image"] for r in records] == [str(a), str(a), str(named)]


def test_records_onto_an_input_or_out_onto_a_file_exit_2(
    fault_run: Path, fault_raw: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    folder = tmp_path / "photos"
    _photos(fault_raw, folder, ["a.jpg", "b.jpg"])
    before = _digests(folder)
    code, err = cf(["predict", "--ckpt", fault_run, folder, "--out", tmp_path / "out",
                    "--jsonl", folder / "b.jpg"], capsys)  # fmt: skip
    line = error_line(err)
    assert code == 2 and str(folder / "b.jpg") in line and "--jsonl" in line, line
    code, err = cf(["predict", "--ckpt", fault_run, folder / "a.jpg", "--out", folder / "b.jpg"],
                   capsys)  # fmt: skip
    line = error_line(err)
    assert code == 2 and str(folder / "b.jpg") in line and "--out" in line, line
    assert _digests(folder) == before and not (tmp_path / "out").exists()
