"""Transforms keep image, boxes, masks and semantic maps consistent; collation pads correctly."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from clusterformer.data.collate import collate, pad_images, pad_semantic
from clusterformer.data.preprocess import default_eval_preprocess, eval_transform
from clusterformer.data.sample_spec import sample_spec
from clusterformer.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    crop,
    hflip,
    random_resized_crop_params,
    resize,
    train_transform,
)


def eval_transform_of(task: str, image_size: int):  # noqa: ANN201 - a Transform
    """The task's default evaluation transform at ``image_size`` (what the loader builds)."""
    return eval_transform(default_eval_preprocess(sample_spec(task).transform, image_size))


def _box_of(mask: torch.Tensor) -> torch.Tensor:
    """Tight xyxy box (pixel edges) of a non-empty bool (H, W) mask."""
    ys, xs = torch.nonzero(mask, as_tuple=True)
    return torch.tensor([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=torch.float32)


def make_sample(h: int = 48, w: int = 64, seed: int = 0, n: int = 3) -> dict:
    """Image whose pixels encode instance ids, masks = rectangles, boxes = their exact boxes."""
    g = torch.Generator().manual_seed(seed)
    image = torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g)
    masks = torch.zeros((n, h, w), dtype=torch.bool)
    semantic = torch.full((h, w), 255, dtype=torch.int64)
    boxes = []
    for i in range(n):
        x0 = int(torch.randint(0, w - 8, (), generator=g))
        y0 = int(torch.randint(0, h - 8, (), generator=g))
        x1 = x0 + 4 + int(torch.randint(0, w - x0 - 4, (), generator=g))
        y1 = y0 + 4 + int(torch.randint(0, h - y0 - 4, (), generator=g))
        masks[i, y0:y1, x0:x1] = True
        semantic[y0:y1, x0:x1] = i
        boxes.append([x0, y0, x1, y1])
    return {
        "key": f"s{seed}",
        "image": image,
        "image_id": seed,
        "orig_size": (h, w),
        "boxes": torch.tensor(boxes, dtype=torch.float32),
        "masks": masks,
        "labels": torch.arange(n, dtype=torch.int64),
        "iscrowd": torch.zeros(n, dtype=torch.bool),
        "isthing": torch.ones(n, dtype=torch.bool),
        "segment_ids": torch.arange(1, n + 1, dtype=torch.int64),
        "semantic": semantic,
        "label": 2,
    }


def _assert_consistent(out: dict, tol: float) -> None:
    n = out["masks"].shape[0]
    h, w = out["image"].shape[-2:]
    assert out["masks"].shape[1:] == (h, w) and out["semantic"].shape == (h, w)
    for name in ("boxes", "labels", "iscrowd", "isthing", "segment_ids"):
        assert out[name].shape[0] == n, name
    for i in range(n):
        assert out["masks"][i].any()
        torch.testing.assert_close(out["boxes"][i], _box_of(out["masks"][i]), atol=tol, rtol=0)
    assert (out["boxes"][:, 0::2] >= 0).all() and (out["boxes"][:, 0::2] <= w).all()
    assert (out["boxes"][:, 1::2] >= 0).all() and (out["boxes"][:, 1::2] <= h).all()


def test_hflip_twice_is_identity_and_keeps_boxes() -> None:
    s = make_sample()
    once = hflip(s)
    _assert_consistent(once, tol=0.0)
    twice = hflip(once)
    for name in ("image", "boxes", "masks", "semantic"):
        assert torch.equal(twice[name], s[name]), name
    assert torch.equal(s["image"], make_sample()["image"])  # input untouched


def test_crop_drops_vanished_instances_with_their_fields() -> None:
    s = make_sample(n=1)
    s["masks"] = torch.zeros((2, 48, 64), dtype=torch.bool)
    s["masks"][0, 0:10, 0:10] = True
    s["masks"][1, 30:40, 40:60] = True
    s["boxes"] = torch.tensor([[0, 0, 10, 10], [40, 30, 60, 40]], dtype=torch.float32)
    s["labels"] = torch.tensor([5, 7])
    s["iscrowd"] = torch.tensor([False, True])
    s["isthing"] = torch.tensor([True, False])
    s["segment_ids"] = torch.tensor([11, 12])
    out = crop(s, 20, 20, 28, 44)
    assert out["labels"].tolist() == [7] and out["iscrowd"].tolist() == [True]
    assert out["isthing"].tolist() == [False] and out["segment_ids"].tolist() == [12]
    assert out["boxes"].tolist() == [[20.0, 10.0, 40.0, 20.0]]
    assert out["masks"].shape == (1, 28, 44)
    with pytest.raises(ValueError, match="outside"):
        crop(s, 40, 0, 20, 10)


def test_resize_with_window_equals_resize_then_crop() -> None:
    s = make_sample(seed=3)
    full = crop(resize(s, (96, 128)), 10, 30, 40, 50)
    fused = resize(s, (96, 128), window=(10, 30, 40, 50))
    for name in ("image", "boxes", "masks", "semantic", "labels"):
        assert torch.equal(full[name], fused[name]), name


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    task=st.sampled_from(["instance", "panoptic"]),
    h=st.integers(24, 80),
    w=st.integers(24, 80),
)
def test_train_transforms_keep_masks_and_boxes_consistent(
    seed: int, task: str, h: int, w: int
) -> None:
    s = make_sample(h=h, w=w, seed=seed)
    out = train_transform(task, 40)(s, torch.Generator().manual_seed(seed))
    assert out["image"].dtype == torch.float32
    assert out["image"].shape[-2] <= 40 and out["image"].shape[-1] <= 40
    assert out["size"] == tuple(out["image"].shape[-2:])
    # Nearest resampling of a rectangle moves each edge by at most one source pixel.
    scale = max(out["image"].shape[-2:]) / max(h, w)
    _assert_consistent(out, tol=max(1.0, scale) + 1e-3)
    # Class k was painted only inside instance k's mask (labels == instance index here), so the
    # transformed map must still be inside the transformed mask, or absent with the instance.
    kept = dict(zip(out["labels"].tolist(), out["masks"], strict=True))
    for k in range(3):
        where = out["semantic"] == k
        assert (where & ~kept[k]).sum() == 0 if k in kept else not where.any()


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10_000), h=st.integers(8, 90), w=st.integers(8, 90))
def test_classification_transforms_give_square_images(seed: int, h: int, w: int) -> None:
    s = make_sample(h=max(h, 16), w=max(w, 16), seed=seed)
    g = torch.Generator().manual_seed(seed)
    for transform in (train_transform("classification", 32),
                      eval_transform_of("classification", 32)):  # fmt: skip
        out = transform(s, g)
        assert out["image"].shape == (3, 32, 32) and out["label"] == 2


def test_random_resized_crop_params_inside_image_and_seeded() -> None:
    for seed in range(50):
        top, left, h, w = random_resized_crop_params(
            30, 70, generator=torch.Generator().manual_seed(seed)
        )
        assert 0 <= top and 0 <= left and top + h <= 30 and left + w <= 70 and h > 0 and w > 0
    a = random_resized_crop_params(100, 100, generator=torch.Generator().manual_seed(1))
    b = random_resized_crop_params(100, 100, generator=torch.Generator().manual_seed(1))
    assert a == b


def test_same_seed_same_output_different_seed_differs() -> None:
    s = make_sample(seed=5)
    t = train_transform("panoptic", 40)
    outs = [t(s, torch.Generator().manual_seed(k)) for k in (1, 1, 2)]
    assert torch.equal(outs[0]["image"], outs[1]["image"])
    assert torch.equal(outs[0]["masks"], outs[1]["masks"])
    assert not (
        outs[0]["image"].shape == outs[2]["image"].shape
        and torch.equal(outs[0]["image"], outs[2]["image"])
    )


def test_dense_eval_resizes_long_side_and_maps_back() -> None:
    s = make_sample(h=48, w=64, seed=7)
    out = eval_transform_of("semantic", 32)(s, None)
    assert out["size"] == (24, 32) and out["orig_size"] == (48, 64)
    back = resize({"image": out["image"], "semantic": out["semantic"]}, out["orig_size"])
    agree = (back["semantic"] == s["semantic"]).float().mean()
    assert agree > 0.9  # only the edges of the rectangles may move by a pixel
    restored = out["boxes"] * torch.tensor([64 / 32, 48 / 24, 64 / 32, 48 / 24])
    torch.testing.assert_close(restored, s["boxes"])


def test_classification_eval_centre_crop_and_normalisation() -> None:
    image = torch.zeros((3, 40, 80), dtype=torch.uint8)
    image[:, :, 40:] = 255  # right half white
    s = {"key": "k", "image": image, "image_id": 0, "orig_size": (40, 80), "label": 1}
    out = eval_transform_of("classification", 28)(s, None)
    assert out["image"].shape == (3, 28, 28)
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1)
    # short side -> 32, long side -> 64, centre crop columns 18..46 straddle the edge at 32.
    torch.testing.assert_close(out["image"][:, :, 0], ((0 - mean) / std).expand(3, 28))
    torch.testing.assert_close(out["image"][:, :, -1], ((1 - mean) / std).expand(3, 28))


def test_unknown_task_and_bad_size_rejected() -> None:
    with pytest.raises(ValueError, match="unknown task"):
        train_transform("depth", 32)
    with pytest.raises(ValueError, match="positive"):
        train_transform("semantic", 0)


def test_pad_images_and_masks() -> None:
    a, b = torch.ones((3, 4, 6)), torch.full((3, 5, 2), 2.0)
    images, mask = pad_images([a, b])
    assert images.shape == (2, 3, 5, 6) and mask.shape == (2, 5, 6)
    assert mask[0].sum() == 24 and mask[1].sum() == 10
    assert (images[0][:, ~mask[0]] == 0).all() and (images[1][:, ~mask[1]] == 0).all()
    assert torch.equal(images[0, :, :4, :6], a) and torch.equal(images[1, :, :5, :2], b)
    sem = pad_semantic(
        [torch.zeros((4, 6), dtype=torch.int64), torch.ones((5, 2), dtype=torch.int64)]
    )
    assert sem.shape == (2, 5, 6) and (sem[0, 4] == 255).all() and (sem[1, :, 2:] == 255).all()


def test_collate_classification_and_dense() -> None:
    t_cls = eval_transform_of("classification", 16)
    samples = [t_cls(make_sample(seed=k), None) for k in range(3)]
    batch = collate(samples, "classification")
    assert batch["images"].shape == (3, 3, 16, 16) and batch["labels"].dtype == torch.int64
    assert batch["labels"].tolist() == [2, 2, 2] and batch["keys"] == ["s0", "s1", "s2"]
    assert batch["valid"].all() and "targets" not in batch

    t_dense = eval_transform_of("instance", 32)
    dense = [
        t_dense(make_sample(h=48, w=64, seed=0), None),
        t_dense(make_sample(h=64, w=40, seed=1), None),
    ]
    batch = collate(dense, "instance", valid=[True, False])
    assert batch["images"].shape == (2, 3, 32, 32)
    assert batch["pixel_mask"][0, :24].all() and not batch["pixel_mask"][0, 24:].any()
    assert batch["pixel_mask"][1, :, :20].all() and not batch["pixel_mask"][1, :, 20:].any()
    assert batch["valid"].tolist() == [True, False]
    tgt = batch["targets"][1]
    assert set(tgt) == {
        "boxes",
        "labels",
        "iscrowd",
        "masks",
        "image_id",
        "orig_size",
        "size",
        "key",
    }
    assert tgt["orig_size"] == (64, 40) and tgt["size"] == (32, 20) and tgt["image_id"] == 1
    no_semantic = [{k: v for k, v in d.items() if k != "semantic"} for d in dense]
    with pytest.raises(ValueError, match="lacks semantic"):
        collate(no_semantic, "semantic")
