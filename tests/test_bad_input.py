"""Bad input: stop gives one clear line + non-zero exit and no whole-looking output; skip counts."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from clusterformer.cli.app import main
from clusterformer.data.formats import open_source
from clusterformer.data.records import decode_record, encode_record
from clusterformer.data.shapes import make_shapes

ARGS = {
    "coco": ["--images", "{r}/images", "--annotations", "{r}/instances.json"],
    "coco-panoptic": ["--images", "{r}/images", "--annotations", "{r}/panoptic.json", "--masks", "{r}/panoptic"],
    "ade20k": ["--images", "{r}/images", "--masks", "{r}/semantic"],
    "imagefolder": ["--images", "{r}/classes"],
}
NUM = 8


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    return Path(make_shapes(tmp_path_factory.mktemp("shapes") / "s", num_images=NUM, image_size=48)["root"])


@pytest.fixture
def root(pristine, tmp_path) -> Path:
    return Path(shutil.copytree(pristine, tmp_path / "data"))


def run(root: Path, fmt: str, out: Path, capsys, *extra: str) -> tuple[int, str]:
    args = [a.format(r=root) for a in ARGS[fmt]]
    try:
        main(["shard-dataset", "--format", fmt, *args, "--out", str(out), *extra])
        code = 0
    except SystemExit as exc:
        code = exc.code or 0
    return code, capsys.readouterr().err


def _edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def _first_ann(data: dict, image_id: int) -> dict:
    return next(a for a in data["annotations"] if a["image_id"] == image_id)


def truncate(root: Path) -> tuple[str, str]:
    path = root / "images" / "000002.jpg"
    path.write_bytes(path.read_bytes()[: 300])
    return "coco", str(path)


def garbage(root: Path) -> tuple[str, str]:
    path = root / "classes" / "triangle" / "000002.jpg"
    path.write_bytes(b"this is not a jpeg")
    return "imagefolder", str(path)


def missing(root: Path) -> tuple[str, str]:
    (root / "images" / "000002.jpg").unlink()
    return "coco", str(root / "images" / "000002.jpg")


def bbox_outside(root: Path) -> tuple[str, str]:
    _edit_json(root / "instances.json", lambda d: _first_ann(d, 3).update(bbox=[40.0, 40.0, 30.0, 30.0]))
    return "coco", str(root / "images" / "000002.jpg")


def bbox_zero(root: Path) -> tuple[str, str]:
    _edit_json(root / "instances.json", lambda d: _first_ann(d, 3).update(bbox=[4.0, 4.0, 0.0, 9.0]))
    return "coco", str(root / "images" / "000002.jpg")


def area_zero(root: Path) -> tuple[str, str]:
    _edit_json(root / "instances.json", lambda d: _first_ann(d, 3).update(area=0))
    return "coco", str(root / "images" / "000002.jpg")


def unknown_category(root: Path) -> tuple[str, str]:
    _edit_json(root / "instances.json", lambda d: _first_ann(d, 3).update(category_id=99))
    return "coco", str(root / "images" / "000002.jpg")


def panoptic_ids(root: Path) -> tuple[str, str]:
    _edit_json(root / "panoptic.json", lambda d: _first_ann(d, 3)["segments_info"][0].update(id=4242))
    return "coco-panoptic", str(root / "panoptic" / "000002.png")


def panoptic_area(root: Path) -> tuple[str, str]:
    _edit_json(root / "panoptic.json", lambda d: _first_ann(d, 3)["segments_info"][0].update(area=1))
    return "coco-panoptic", str(root / "panoptic" / "000002.png")


def semantic_value(root: Path) -> tuple[str, str]:
    path = root / "semantic" / "000002.png"
    values = np.asarray(Image.open(path)).copy()
    values[0, 0] = 50
    Image.fromarray(values).save(path)
    return "ade20k", str(path)


def semantic_size(root: Path) -> tuple[str, str]:
    path = root / "semantic" / "000002.png"
    Image.fromarray(np.ones((10, 12), np.uint8)).save(path)
    return "ade20k", str(path)


CASES = [
    (truncate, "cannot decode image"),
    (garbage, "cannot decode image"),
    (missing, "image file not found"),
    (bbox_outside, "lies outside the 48x48 image"),
    (bbox_zero, "has zero area"),
    (area_zero, "area 0 is zero"),
    (unknown_category, "unknown category id 99"),
    (panoptic_ids, "panoptic PNG ids do not match segments_info"),
    (panoptic_area, "area 1 in the JSON"),
    (semantic_value, "label values [50] are not in classes.json"),
    (semantic_size, "label map is 12x10, the image is 48x48"),
]


@pytest.mark.parametrize(("corrupt", "reason"), CASES, ids=[c[0].__name__ for c in CASES])
def test_stop_reports_and_skip_counts(root, tmp_path, capsys, corrupt, reason):
    fmt, path = corrupt(root)
    key = "triangle_000002" if fmt == "imagefolder" else "000002"
    out = tmp_path / "out"
    code, err = run(root, fmt, out, capsys, "--samples-per-shard", "2")
    assert code != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"cf: error: {path} (sample {key}): "), err
    assert reason in lines[0]
    assert not [p.name for p in out.iterdir() if p.name == "dataset.json" or p.name.endswith(".tar")]
    assert not list(out.glob(".*tmp"))

    code, err = run(root, fmt, out, capsys, "--on-error", "skip", "--samples-per-shard", "2")
    assert code == 0, err
    info = json.loads((out / "dataset.json").read_text())
    assert info["skipped"] == 1 and info["num_samples"] == NUM - 1
    listed = [json.loads(line) for line in (out / "skipped.jsonl").read_text().splitlines()]
    assert listed == [{"key": key, "path": path, "reason": listed[0]["reason"]}]
    assert reason in listed[0]["reason"]
    assert "1 skipped" in err


def test_invalid_json_is_one_line_in_both_modes(root, tmp_path, capsys):
    (root / "instances.json").write_text('{"images": [1, 2,')
    for mode in ("stop", "skip"):
        code, err = run(root, "coco", tmp_path / "out", capsys, "--on-error", mode)
        assert code != 0
        assert err.strip().startswith(f"cf: error: {root / 'instances.json'}: invalid JSON in annotations file")
        assert len(err.strip().splitlines()) == 1


def _png(image: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kw)
    return buffer.getvalue()


def test_odd_image_modes_are_kept_as_bytes_and_decode_to_rgb(root, tmp_path, capsys):
    rgb = Image.open(root / "classes" / "circle" / "000000.jpg").convert("RGB")
    odd = {
        "grey.png": _png(rgb.convert("L")),
        "rgba.png": _png(rgb.convert("RGBA")),
        "cmyk.jpg": _png(rgb.convert("CMYK"), "JPEG"),
        "deep.png": _png(Image.fromarray(np.asarray(rgb.convert("L")).astype(np.uint16) * 257)),
        "palette.png": _png(rgb.convert("P")),
    }
    for name, data in odd.items():
        (root / "classes" / "circle" / name).write_bytes(data)
    code, err = run(root, "imagefolder", tmp_path / "out", capsys)
    assert code == 0, err
    source = open_source("imagefolder", root / "classes")
    records = {r.key: r for r in source.records()}
    for name, data in odd.items():
        record = records[f"circle_{Path(name).stem}"]
        assert record.image_bytes == data
        sample = decode_record(encode_record(record), source.info)
        assert sample["image"].shape == (3, 48, 48) and sample["image"].dtype == torch.uint8


def _exif_dataset(tmp_path: Path, json_size: tuple[int, int]) -> Path:
    """One 40x20 (W x H) picture stored rotated (20x40) with EXIF orientation 6."""
    root = tmp_path / "exif"
    (root / "images").mkdir(parents=True)
    upright = np.zeros((20, 40, 3), np.uint8)
    upright[:, :20] = 255
    stored = Image.fromarray(upright).transpose(Image.Transpose.ROTATE_90)  # 20 wide, 40 high
    exif = Image.Exif()
    exif[0x0112] = 6
    (root / "images" / "a.jpg").write_bytes(_png(stored, "JPEG", quality=95, exif=exif.tobytes()))
    width, height = json_size
    coco = {
        "images": [{"id": 1, "file_name": "a.jpg", "width": width, "height": height}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 5, "bbox": [0, 0, 20, 20], "area": 400,
                         "iscrowd": 0, "segmentation": [[0, 0, 20, 0, 20, 20, 0, 20]]}],
        "categories": [{"id": 5, "name": "white"}],
    }  # fmt: skip
    (root / "instances.json").write_text(json.dumps(coco))
    return root


def test_exif_orientation_applied_and_annotations_refer_to_oriented_image(tmp_path, capsys):
    root = _exif_dataset(tmp_path, (40, 20))
    code, err = run(root, "coco", tmp_path / "out", capsys)
    assert code == 0, err
    sample = next(open_source("coco", root / "images", annotations=root / "instances.json").samples())
    assert sample["image"].shape == (3, 20, 40) and sample["orig_size"] == (20, 40)
    assert sample["image"][:, :, :15].float().mean() > 200  # the white half is on the left
    assert sample["masks"].shape == (1, 20, 40) and int(sample["masks"].sum()) == 400


def test_annotations_for_the_unrotated_image_are_reported(tmp_path, capsys):
    root = _exif_dataset(tmp_path, (20, 40))
    code, err = run(root, "coco", tmp_path / "out", capsys)
    assert code != 0 and "(sample a): image is 40x20 after EXIF orientation, the annotations say 20x40" in err
    assert "ignore the EXIF rotation" in err
