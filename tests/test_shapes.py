"""cf make-shapes: determinism and validity of all four formats it writes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from clusterformer.data.images import decode_panoptic_png
from clusterformer.data.shapes import CATEGORY_IDS, SEMANTIC_CLASSES, make_shapes

# pycocotools calls numpy.asarray(copy=False) and warns under numpy 2
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

NUM, SIZE = 16, 96


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> dict:
    return make_shapes(tmp_path_factory.mktemp("shapes") / "out", num_images=NUM, image_size=SIZE)


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_is_byte_identical_and_other_seed_differs(shapes, tmp_path):
    again = make_shapes(tmp_path / "again", num_images=NUM, image_size=SIZE)
    first, second = _tree(Path(shapes["root"])), _tree(Path(again["root"]))
    assert first.keys() == second.keys()
    assert all(first[name] == second[name] for name in first)
    other = _tree(Path(make_shapes(tmp_path / "other", num_images=NUM, image_size=SIZE, seed=1)["root"]))
    assert other.keys() == first.keys()
    assert other["images/000000.jpg"] != first["images/000000.jpg"]
    assert other["instances.json"] != first["instances.json"]


def test_layout(shapes):
    root = Path(shapes["root"])
    stems = [f"{i:06d}" for i in range(NUM)]
    assert sorted(p.stem for p in (root / "images").glob("*.jpg")) == stems
    assert sorted(p.stem for p in (root / "panoptic").glob("*.png")) == stems
    assert sorted(p.stem for p in (root / "semantic").glob("*.png")) == stems
    folders = sorted(p.name for p in (root / "classes").iterdir())
    assert folders == ["circle", "ellipse", "rectangle", "triangle"]
    counts = [len(list((root / "classes" / f).glob("*.jpg"))) for f in folders]
    assert sum(counts) == NUM and min(counts) == NUM // 4
    for path in (root / "images").glob("*.jpg"):
        with Image.open(path) as image:
            assert image.size == (SIZE, SIZE) and image.mode == "RGB"


def test_coco_instances_load_with_pycocotools(shapes):
    from pycocotools.coco import COCO

    coco = COCO(shapes["instances"])
    cat_ids = sorted(coco.getCatIds())
    assert cat_ids == [1, 3, 7, 12]  # non-contiguous on purpose
    anns = coco.loadAnns(coco.getAnnIds())
    assert len(anns) == shapes["num_annotations"] > 0
    assert any(a["iscrowd"] for a in anns), "expected at least one crowd region"
    for ann in anns:
        if ann["iscrowd"]:
            assert isinstance(ann["segmentation"], dict) and isinstance(ann["segmentation"]["counts"], list)
        else:
            assert isinstance(ann["segmentation"], list) and ann["segmentation"]
        mask = coco.annToMask(ann).astype(bool)
        assert mask.sum() == ann["area"] > 0
        x, y, w, h = ann["bbox"]
        ys, xs = np.nonzero(mask)
        assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == (x, y, x + w, y + h)
    # an image without annotations (a negative, as COCO has) is listed
    assert any(not coco.getAnnIds(imgIds=[i]) for i in coco.getImgIds())


def test_panoptic_png_matches_segments_info(shapes):
    root = Path(shapes["root"])
    panoptic = json.loads(Path(shapes["panoptic_json"]).read_text())
    categories = {c["id"]: c for c in panoptic["categories"]}
    assert {c["isthing"] for c in categories.values()} == {0, 1}
    for ann in panoptic["annotations"]:
        ids = decode_panoptic_png((root / "panoptic" / ann["file_name"]).read_bytes())
        values, counts = np.unique(ids, return_counts=True)
        pixels = {int(v): int(c) for v, c in zip(values, counts, strict=True) if v}
        assert pixels == {s["id"]: s["area"] for s in ann["segments_info"]}
        assert all(s["category_id"] in categories for s in ann["segments_info"])


def test_instance_masks_agree_with_panoptic_and_semantic(shapes):
    """The same scene in three formats: polygons, panoptic ids and class map agree pixel for pixel."""
    from pycocotools.coco import COCO

    root = Path(shapes["root"])
    coco = COCO(shapes["instances"])
    panoptic = {a["image_id"]: a for a in json.loads(Path(shapes["panoptic_json"]).read_text())["annotations"]}
    for image_id in coco.getImgIds():
        stem = Path(coco.imgs[image_id]["file_name"]).stem
        ids = decode_panoptic_png((root / "panoptic" / f"{stem}.png").read_bytes())
        semantic = np.asarray(Image.open(root / "semantic" / f"{stem}.png"))
        segments = {s["id"]: s for s in panoptic[image_id]["segments_info"]}
        things = [s for s in segments.values() if s["category_id"] in (1, 3, 7, 12)]
        anns = coco.loadAnns(coco.getAnnIds(imgIds=[image_id]))
        assert len(things) == len(anns)
        for ann in anns:
            mask = coco.annToMask(ann).astype(bool)
            segment_ids = np.unique(ids[mask])
            assert segment_ids.size == 1 and segments[int(segment_ids[0])]["category_id"] == ann["category_id"]
        for seg_id, seg in segments.items():
            name = next(n for n, c in CATEGORY_IDS.items() if c == seg["category_id"])
            assert np.all(semantic[ids == seg_id] == SEMANTIC_CLASSES.index(name) + 1)


def test_semantic_values_in_range(shapes):
    root = Path(shapes["root"])
    classes = json.loads(Path(shapes["classes_json"]).read_text())
    assert classes["ignore_index"] == 0 and classes["num_classes"] == len(SEMANTIC_CLASSES)
    assert [c["id"] for c in classes["classes"]] == list(range(len(SEMANTIC_CLASSES) + 1))
    seen = set()
    for path in (root / "semantic").glob("*.png"):
        with Image.open(path) as image:
            assert image.mode == "L"
            seen |= set(np.unique(np.asarray(image)).tolist())
    assert seen <= set(range(len(SEMANTIC_CLASSES) + 1)) and len(seen) >= 5


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="num-images"):
        make_shapes(tmp_path, num_images=0)
    with pytest.raises(ValueError, match="image-size"):
        make_shapes(tmp_path, image_size=8)


def test_cli_make_shapes(tmp_path, capsys):
    from clusterformer.cli.app import main

    with pytest.raises(SystemExit) as exit_info:
        main(["make-shapes", str(tmp_path / "cli"), "--num-images", "4", "--image-size", "48", "--seed", "2"])
    assert exit_info.value.code == 0
    assert "wrote 4 scenes" in capsys.readouterr().err
    direct = make_shapes(tmp_path / "direct", num_images=4, image_size=48, seed=2)
    assert _tree(tmp_path / "cli") == _tree(Path(direct["root"]))


def test_kinds_write_the_same_files_alone_as_together(shapes, tmp_path):
    full = _tree(Path(shapes["root"]))
    for kind, prefix in (("classes", "classes/"), ("scenes", None)):
        alone = _tree(Path(make_shapes(tmp_path / kind, num_images=NUM, image_size=SIZE,
                                       kinds=(kind,))["root"]))  # fmt: skip
        expected = {k: v for k, v in full.items()
                    if (k.startswith("classes/") if prefix else not k.startswith("classes/"))}  # fmt: skip
        assert alone == expected and alone
    with pytest.raises(ValueError, match="kinds"):
        make_shapes(tmp_path / "bad", kinds=("pictures",))


def test_cli_only_classification(tmp_path, capsys):
    from clusterformer.cli.app import main

    with pytest.raises(SystemExit) as exit_info:
        main(["make-shapes", str(tmp_path / "c"), "--num-images", "4", "--only", "classes"])
    assert exit_info.value.code == 0
    assert not (tmp_path / "c" / "images").exists() and len(list((tmp_path / "c").rglob("*.jpg"))) == 4
    with pytest.raises(SystemExit) as exit_info:
        main(["make-shapes", str(tmp_path / "d"), "--only", "videos"])
    assert exit_info.value.code != 0 and "--only" in capsys.readouterr().err


def test_thing_scale_sets_the_size_of_the_things(tmp_path, capsys):
    from clusterformer.cli.app import main

    def thing_areas(root: Path) -> list[int]:
        coco = json.loads((root / "instances.json").read_text())
        return [a["area"] for a in coco["annotations"] if not a["iscrowd"]]

    small = thing_areas(Path(make_shapes(tmp_path / "s", num_images=12, image_size=64,
                                         kinds=("scenes",))["root"]))  # fmt: skip
    with pytest.raises(SystemExit) as exit_info:
        main(["make-shapes", str(tmp_path / "l"), "--num-images", "12", "--image-size", "64",
              "--only", "scenes", "--thing-scale", "0.2", "0.3", "--no-occlusion"])  # fmt: skip
    assert exit_info.value.code == 0
    direct = make_shapes(tmp_path / "direct", num_images=12, image_size=64, kinds=("scenes",),
                         thing_scale=(0.2, 0.3), occlusion=False)  # fmt: skip
    assert _tree(tmp_path / "l") == _tree(Path(direct["root"]))
    large = thing_areas(tmp_path / "l")
    assert np.median(large) > 1.5 * np.median(small)
    assert max(large) <= 64 * 64 and min(large) >= 12
    with pytest.raises(ValueError, match="thing_scale"):
        make_shapes(tmp_path / "bad", thing_scale=(0.3, 0.2))
    with pytest.raises(SystemExit) as exit_info:
        main(["make-shapes", str(tmp_path / "bad2"), "--thing-scale", "0", "0.2"])
    assert exit_info.value.code != 0 and "thing_scale" in capsys.readouterr().err


def test_scenes_without_occlusion_show_every_thing_whole():
    from clusterformer.data.shapes_scene import random_scene

    kept = 0
    for index in range(12):
        scene = random_scene(np.random.default_rng([3, index]), 64, 4, index % 3 == 0,
                             (0.15, 0.3), occlusion=False)  # fmt: skip
        for thing, visible in zip(scene.things, scene.visible, strict=True):
            kept += not thing.crowd
            assert np.array_equal(visible, thing.mask)  # nothing covers any part of it
        masks = [t.mask for t in scene.things]
        for i, a in enumerate(masks):
            for b in masks[i + 1:]:
                assert not (a & b).any()
    assert kept >= 12
    occluded = [random_scene(np.random.default_rng([3, i]), 64, 4, False, (0.15, 0.3))
                for i in range(12)]  # fmt: skip
    assert any(not np.array_equal(v, t.mask)
               for s in occluded for t, v in zip(s.things, s.visible, strict=True))


def test_contrast_paints_things_apart_from_their_background(tmp_path):
    from clusterformer.cli.app import main
    from clusterformer.data.shapes_scene import random_scene

    def colour_gaps(contrast: bool) -> list[float]:
        gaps = []
        for index in range(24):
            scene = random_scene(np.random.default_rng([5, index]), 64, 4, False, (0.15, 0.3),
                                 occlusion=False, contrast=contrast)  # fmt: skip
            for thing, visible in zip(scene.things, scene.visible, strict=True):
                ring = ndimage.binary_dilation(visible, iterations=2) & ~visible
                gaps.append(float(np.abs(thing.colour - scene.image[ring].mean(axis=0)).sum()))
        return gaps

    plain, contrasting = colour_gaps(False), colour_gaps(True)
    assert min(contrasting) > np.percentile(plain, 10)  # the near-invisible things are gone
    assert np.median(contrasting) > np.median(plain)
    with pytest.raises(SystemExit) as exit_info:
        main(["make-shapes", str(tmp_path / "c"), "--num-images", "6", "--image-size", "64",
              "--only", "scenes", "--contrast"])  # fmt: skip
    assert exit_info.value.code == 0
    direct = make_shapes(tmp_path / "direct", num_images=6, image_size=64, kinds=("scenes",),
                         contrast=True)  # fmt: skip
    assert _tree(tmp_path / "c") == _tree(Path(direct["root"]))
    assert _tree(tmp_path / "c") != _tree(Path(make_shapes(tmp_path / "p", num_images=6,
                                                           image_size=64, kinds=("scenes",))["root"]))  # fmt: skip
