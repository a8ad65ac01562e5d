"""Raw-format readers on make-shapes output, image decoding of odd modes, category mapping."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from clusterformer.data.categories import semantic_lut, to_dataset_ids, train_id_to_id
from clusterformer.data.formats import open_source
from clusterformer.data.images import decode_image
from clusterformer.data.polygons import mask_to_rle, polygons_to_mask
from clusterformer.data.shapes import make_shapes
from clusterformer.data.source import unique_keys

# pycocotools calls numpy.asarray(copy=False) and warns under numpy 2
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return Path(make_shapes(tmp_path_factory.mktemp("shapes") / "s", num_images=8, image_size=64)["root"])


def _open(root: Path, fmt: str):
    args = {
        "coco": dict(images=root / "images", annotations=root / "instances.json"),
        "coco-panoptic": dict(images=root / "images", annotations=root / "panoptic.json", masks=root / "panoptic"),
        "ade20k": dict(images=root / "images", masks=root / "semantic"),
        "imagefolder": dict(images=root / "classes"),
    }[fmt]
    return open_source(fmt, **args)


def _common(sample: dict) -> None:
    assert re.fullmatch(r"[A-Za-z0-9_-]+", sample["key"])
    image = sample["image"]
    assert image.dtype == torch.uint8 and image.shape == (3, 64, 64)
    assert sample["orig_size"] == (64, 64)


def test_coco_reader_matches_pycocotools(root):
    from pycocotools.coco import COCO

    source = _open(root, "coco")
    coco = COCO(str(root / "instances.json"))
    assert [c["id"] for c in source.info["categories"]] == [1, 3, 7, 12]
    assert [c["train_id"] for c in source.info["categories"]] == [0, 1, 2, 3]
    samples = list(source.samples())
    assert len(samples) == 8 and any(len(s["labels"]) == 0 for s in samples)  # negative kept
    for sample in samples:
        _common(sample)
        anns = coco.loadAnns(coco.getAnnIds(imgIds=[sample["image_id"]]))
        n = len(anns)
        assert sample["boxes"].shape == (n, 4) and sample["boxes"].dtype == torch.float32
        assert sample["masks"].shape == (n, 64, 64) and sample["masks"].dtype == torch.bool
        assert sample["labels"].dtype == torch.int64 and sample["iscrowd"].dtype == torch.bool
        assert to_dataset_ids(sample["labels"].tolist(), source.info["categories"]) == [a["category_id"] for a in anns]
        for i, ann in enumerate(anns):
            assert np.array_equal(sample["masks"][i].numpy(), coco.annToMask(ann).astype(bool))
            x, y, w, h = ann["bbox"]
            assert sample["boxes"][i].tolist() == [x, y, x + w, y + h]
            assert bool(sample["iscrowd"][i]) == bool(ann["iscrowd"])


def test_panoptic_reader(root):
    source = _open(root, "coco-panoptic")
    cats = source.info["categories"]
    assert [c["id"] for c in cats] == [1, 3, 7, 12, 21, 25, 33]
    assert [c["isthing"] for c in cats] == [True] * 4 + [False] * 3
    panoptic = {a["image_id"]: a for a in json.loads((root / "panoptic.json").read_text())["annotations"]}
    for sample in source.samples():
        _common(sample)
        segments = panoptic[sample["image_id"]]["segments_info"]
        assert sample["segment_ids"].tolist() == [s["id"] for s in segments]
        assert sample["masks"].sum(dim=(1, 2)).tolist() == [s["area"] for s in segments]
        assert sample["isthing"].tolist() == [s["category_id"] < 20 for s in segments]
        # the masks partition the image (make-shapes leaves no void)
        assert torch.equal(sample["masks"].sum(0), torch.ones(64, 64, dtype=torch.int64))


def test_ade20k_reader_maps_zero_to_ignore(root):
    source = _open(root, "ade20k")
    assert source.info["ignore_index"] == 255 and len(source.info["categories"]) == 7
    for sample in source.samples():
        _common(sample)
        raw = np.asarray(Image.open(root / "semantic" / f"{sample['key']}.png")).astype(np.int64)
        expected = np.where(raw == 0, 255, raw - 1)
        assert sample["semantic"].dtype == torch.int64
        assert np.array_equal(sample["semantic"].numpy(), expected)


def test_imagefolder_reader(root):
    source = _open(root, "imagefolder")
    names = [c["name"] for c in source.info["categories"]]
    assert names == ["circle", "ellipse", "rectangle", "triangle"]
    samples = list(source.samples())
    assert len(samples) == 8
    for sample in samples:
        _common(sample)
        assert sample["key"].startswith(names[sample["label"]] + "_")


def test_semantic_lut_and_id_maps():
    cats = [{"id": 3, "train_id": 0}, {"id": 9, "train_id": 1}]
    lut = semantic_lut(cats, max_value=10)
    assert lut.tolist() == [255, 255, 255, 0, 255, 255, 255, 255, 255, 1, 255]
    assert train_id_to_id(cats) == [3, 9] and to_dataset_ids([1, 0, 1], cats) == [9, 3, 9]


def test_open_source_rejects_wrong_arguments(root):
    with pytest.raises(ValueError, match="needs --annotations"):
        open_source("coco", root / "images")
    with pytest.raises(ValueError, match="--masks is not used"):
        open_source("coco", root / "images", annotations=root / "instances.json", masks=root)
    with pytest.raises(ValueError, match="unknown format"):
        open_source("voc", root / "images")


def _encode(image: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kw)
    return buffer.getvalue()


@pytest.mark.parametrize("mode", ["L", "LA", "P", "RGBA", "1", "I;16"])
def test_decode_image_converts_modes_to_rgb(mode):
    grey = np.tile(np.arange(0, 256, 8, dtype=np.uint8), (20, 1))  # (20, 32)
    if mode == "I;16":
        image = Image.fromarray(grey.astype(np.uint16) * 257)  # 16-bit PNG
    else:
        image = Image.fromarray(np.stack([grey] * 3, -1)).convert(mode)
    out = decode_image(_encode(image), "x")
    assert out.shape == (3, 20, 32) and out.dtype == torch.uint8
    if mode in ("L", "LA", "RGBA", "I;16"):
        assert torch.equal(out[0], torch.from_numpy(grey)) and torch.equal(out[0], out[2])


def test_decode_image_cmyk_jpeg_and_exif_orientation():
    rgb = np.zeros((20, 40, 3), dtype=np.uint8)
    rgb[:, :20] = 255  # left half white
    out = decode_image(_encode(Image.fromarray(rgb).convert("CMYK"), "JPEG", quality=95))
    assert out.shape == (3, 20, 40) and out[:, :, :15].float().mean() > 200 and out[:, :, 25:].float().mean() < 50
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    data = _encode(Image.fromarray(rgb), "JPEG", quality=95, exif=exif.tobytes())
    rotated = decode_image(data)
    assert rotated.shape == (3, 40, 20)  # H and W swapped
    assert rotated[:, :15].float().mean() > 200 and rotated[:, 25:].float().mean() < 50


@settings(max_examples=30, deadline=None)
@given(st.lists(st.booleans(), min_size=12, max_size=12), st.integers(1, 5))
def test_rle_round_trip(bits, height):
    from pycocotools import mask as mask_utils

    width = 12 // height if 12 % height == 0 else 1
    mask = np.resize(np.array(bits), (height, width))
    rle = mask_to_rle(mask)
    decoded = mask_utils.decode(mask_utils.frPyObjects(rle, height, width)).astype(bool)
    assert np.array_equal(decoded, mask) and sum(rle["counts"]) == mask.size


def test_polygons_to_mask_empty():
    assert not polygons_to_mask([], 4, 5).any()


@given(st.lists(st.text(max_size=6), min_size=1, max_size=20))
def test_unique_keys_are_safe_and_distinct(names):
    keys = unique_keys(names)
    assert len(set(keys)) == len(keys) == len(names)
    assert all(re.fullmatch(r"[A-Za-z0-9_-]+", k) for k in keys)
