"""Sliding-window inference (mmsegmentation's semantics) and flip / multi-scale TTA as pure
functions: window placement, the per-pixel averaging, agreement with whole-image inference
where windows do not overlap, output shapes per task, the NMS merge of detection views."""

from __future__ import annotations

import pytest
import torch

from clusterformer.models import create_model
from clusterformer.tasks import task_spec
from clusterformer.tasks.detection import class_aware_nms
from clusterformer.tasks.tta import (
    InferencePlan,
    parse_tta,
    predict_batch,
    slide_inference,
    slide_windows,
    view_batch,
)

SMALL = {"hidden_dim": 32, "decoder_heads": 2, "decoder_ffn_dim": 64, "num_queries": 10,
         "decoder_layers": 3}


def test_windows_start_every_stride_and_the_last_ends_at_the_border() -> None:
    assert slide_windows(10, 4, 4, 3) == [(0, 0, 4, 4), (3, 0, 7, 4), (6, 0, 10, 4)]
    rows = slide_windows(11, 4, 4, 3)
    assert [r[0] for r in rows] == [0, 3, 6, 7] and rows[-1][2] == 11
    # an image smaller than the window: one window, as large as the image
    assert slide_windows(3, 5, 8, 4) == [(0, 0, 3, 5)]
    # stride == window on a multiple: a tiling without overlap
    tiles = slide_windows(12, 12, 4, 4)
    assert len(tiles) == 9 and {(top, left) for top, left, _, _ in tiles} == {(a, b) for a in (0, 4, 8) for b in (0, 4, 8)}
    with pytest.raises(ValueError, match="stride"):
        slide_windows(8, 8, 4, 0)


def test_overlapping_scores_are_divided_by_the_windows_covering_each_pixel() -> None:
    images = torch.randn(2, 3, 11, 9)
    # Scores that equal the input give the input back only if every pixel is averaged right.
    same = slide_inference(images, lambda crops: crops.clone(), 4, 3, windows_per_pass=2)
    assert same.shape == (2, 3, 11, 9) and torch.allclose(same, images, atol=1e-6)
    # A constant 1 per window, summed and divided: 1 everywhere; the count map is mmseg's.
    ones = slide_inference(images, lambda crops: torch.ones(crops.shape[0], 1, *crops.shape[-2:]), 4, 3)
    assert torch.allclose(ones, torch.ones(2, 1, 11, 9))
    # A window-position dependent score: pixels in two windows get the mean of both.
    seen = []

    def by_window(crops: torch.Tensor) -> torch.Tensor:
        seen.append(len(seen))
        return torch.full((crops.shape[0], 1, *crops.shape[-2:]), float(len(seen)))

    averaged = slide_inference(torch.zeros(1, 3, 4, 7), by_window, 4, 3, windows_per_pass=1)
    # windows at columns 0-3 (1.0) and 3-6 (2.0): column 3 is covered by both
    assert averaged[0, 0, 0].tolist() == [1.0, 1.0, 1.0, 1.5, 2.0, 2.0, 2.0]
    with pytest.raises(ValueError, match="window size"):
        slide_inference(images, lambda crops: crops[..., :2, :2], 4, 3)


@pytest.fixture(scope="module")
def semantic() -> tuple:
    # A seed whose untrained model labels the test image with more than one class (many label
    # every pixel alike, and then no test here could tell windows from the whole image).
    torch.manual_seed(2)
    task = task_spec("semantic").build(5)
    model = create_model("clusterformer-nano", task="semantic", num_classes=5, **SMALL).eval()
    return task, model


def _dense_batch(images: torch.Tensor, sizes: list[tuple[int, int]], orig: list[tuple[int, int]]) -> dict:
    mask = torch.zeros(images.shape[0], *images.shape[-2:], dtype=torch.bool)
    for i, (h, w) in enumerate(sizes):
        mask[i, :h, :w] = True
    return {"images": images, "pixel_mask": mask,
            "targets": [{"size": s, "orig_size": o} for s, o in zip(sizes, orig, strict=True)]}


@torch.no_grad()
def test_sliding_windows_without_overlap_give_whole_image_labels_per_window(semantic: tuple) -> None:
    """The acceptance: on an image 3x the window, windows tiling it (stride = window) label
    every pixel as whole-image inference on that window's region alone does."""
    task, model = semantic
    window = 32
    torch.manual_seed(1)
    image = torch.randn(1, 3, 3 * window, 3 * window)
    batch = _dense_batch(image, [(96, 96)], [(96, 96)])
    slid = predict_batch(task, model, batch, InferencePlan(slide=(window, window)))[0]
    assert slid.shape == (96, 96) and slid.unique().numel() > 1
    for top in (0, 32, 64):
        for left in (0, 32, 64):
            crop = image[:, :, top:top + window, left:left + window]
            alone = task.postprocess(task.forward(model, _dense_batch(crop, [(32, 32)], [(32, 32)])),
                                     _dense_batch(crop, [(32, 32)], [(32, 32)]))[0]
            assert torch.equal(slid[top:top + window, left:left + window], alone), (top, left)
    # and the windows matter: whole-image inference of the large image labels differently
    whole = task.postprocess(task.forward(model, batch), batch)[0]
    assert not torch.equal(whole, slid)


@torch.no_grad()
def test_slide_and_tta_shapes_follow_the_original_size(semantic: tuple) -> None:
    task, model = semantic
    images = torch.randn(2, 3, 40, 56)
    # the second image is 40x30 at the input size, 80x60 originally
    batch = _dense_batch(images, [(40, 56), (40, 30)], [(40, 56), (80, 60)])
    plain = predict_batch(task, model, batch)
    for test_time in (InferencePlan(slide=(24, 16)), InferencePlan(flip=True, scales=(0.75, 1.0, 1.25)),
                      InferencePlan(slide=(24, 16), flip=True, scales=(1.0, 1.5))):
        labels = predict_batch(task, model, batch, test_time)
        assert [tuple(m.shape) for m in labels] == [(40, 56), (80, 60)]
        assert all(m.dtype == torch.int64 and int(m.min()) >= 0 and int(m.max()) < 5 for m in labels)
    # one view at scale 1 without flip is the plain pass
    assert all(torch.equal(a, b) for a, b in zip(plain, predict_batch(task, model, batch, InferencePlan()),
                                                   strict=True))


@torch.no_grad()
def test_classification_tta_averages_probabilities() -> None:
    torch.manual_seed(0)
    task = task_spec("classification").build(4)
    model = create_model("clusterformer-nano", task="classification", num_classes=4).eval()
    batch = {"images": torch.randn(3, 3, 32, 32), "pixel_mask": torch.ones(3, 32, 32, dtype=torch.bool)}
    merged = predict_batch(task, model, batch, InferencePlan(flip=True, scales=(0.5, 1.0)))
    assert merged.shape == (3, 4)
    views = [task.forward(model, view_batch(batch, s, f)).softmax(-1)
             for s, f in ((0.5, False), (0.5, True), (1.0, False), (1.0, True))]
    assert torch.allclose(merged.softmax(-1), torch.stack(views).mean(0), atol=1e-5)
    mirrored = task.forward(model, {**batch, "images": batch["images"].flip(-1)})
    assert torch.allclose(views[3], mirrored.softmax(-1), atol=1e-5)


@torch.no_grad()
def test_detection_tta_boxes_stay_in_the_image_and_within_top_k() -> None:
    torch.manual_seed(0)
    task = task_spec("detection").build(3, {"top_k": 20})
    model = create_model("clusterformer-nano", task="detection", num_classes=3, **SMALL).eval()
    batch = _dense_batch(torch.randn(2, 3, 48, 48), [(48, 48), (48, 36)], [(96, 96), (64, 48)])
    for test_time in (InferencePlan(flip=True), InferencePlan(flip=True, scales=(0.75, 1.0))):
        for dets, (h, w) in zip(predict_batch(task, model, batch, test_time), [(96, 96), (64, 48)], strict=True):
            assert dets["boxes"].shape[1:] == (4,) and 0 < len(dets["scores"]) <= 20
            assert bool((dets["scores"][:-1] >= dets["scores"][1:]).all())
            boxes = dets["boxes"]
            assert bool((boxes[:, 0] >= 0).all() and (boxes[:, 2] <= w + 1e-4).all())
            assert bool((boxes[:, 1] >= 0).all() and (boxes[:, 3] <= h + 1e-4).all())


def test_mirrored_detections_map_back() -> None:
    task = task_spec("detection").build(2)
    view = {"boxes": torch.tensor([[10.0, 5.0, 30.0, 20.0]]), "scores": torch.tensor([0.9]),
            "labels": torch.tensor([1])}
    assert task.unflip_view(view, (50, 100))["boxes"].tolist() == [[70.0, 5.0, 90.0, 20.0]]


def test_class_aware_nms_keeps_the_best_box_per_overlapping_group() -> None:
    boxes = torch.tensor([[0, 0, 10, 10], [1, 1, 10, 10], [0, 0, 10, 10], [50, 50, 60, 60.0]])
    scores = torch.tensor([0.5, 0.9, 0.8, 0.1])
    labels = torch.tensor([0, 0, 1, 0])
    # box 0 overlaps box 1 (same class, IoU 0.81) and goes; box 2 is another class
    assert class_aware_nms(boxes, scores, labels, 0.5).tolist() == [1, 2, 3]
    assert class_aware_nms(boxes, scores, labels, 0.9).tolist() == [1, 2, 0, 3]


def test_parse_tta() -> None:
    assert parse_tta("flip") == (True, (1.0,))
    assert parse_tta("flip,0.75,1.25") == (True, (0.75, 1.0, 1.25))
    assert parse_tta("1.5, 0.5") == (False, (0.5, 1.0, 1.5))
    assert parse_tta(None) == (False, (1.0,))
    with pytest.raises(ValueError, match="'flop'"):
        parse_tta("flop")
    with pytest.raises(ValueError, match="scale -1"):
        parse_tta("-1")


def test_which_tasks_take_which_strategy_is_the_registry() -> None:
    assert "slide" in task_spec("semantic").test_time
    assert task_spec("classification").test_time == {"tta"}
    assert task_spec("detection").test_time == {"tta"}
    assert task_spec("panoptic").test_time == frozenset()


def test_plans_ask_the_registry_what_a_task_supports() -> None:
    from clusterformer.tasks.tta import make_plan

    plan = make_plan(task_spec("semantic"), (64, 32), "flip,1.5")
    assert plan == InferencePlan(slide=(64, 32), flip=True, scales=(1.0, 1.5)) and plan.active
    assert not make_plan(task_spec("panoptic"), None, None).active
    with pytest.raises(ValueError, match=r"--slide: the detection task does not support it \(tasks that do: semantic\)"):
        make_plan(task_spec("detection"), (64, 32), None)
    with pytest.raises(ValueError, match="--tta: the panoptic task"):
        make_plan(task_spec("panoptic"), None, "flip")
    with pytest.raises(ValueError, match="WINDOW >= STRIDE"):
        make_plan(task_spec("semantic"), (32, 64), None)
