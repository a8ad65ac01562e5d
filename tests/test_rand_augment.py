"""RandAugment / random erasing (timm semantics, pure torch) and their wiring into training."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_runner import run_cf
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image, ImageEnhance, ImageOps

from clusterformer.data import LoaderSpec, build_loader, make_shapes
from clusterformer.data import rand_augment as ra
from clusterformer.data.transforms import train_transform
from clusterformer.engine.config_files import resolve_config
from clusterformer.engine.loop import augment_options


def _image(h: int = 29, w: int = 37, seed: int = 0) -> torch.Tensor:
    """uint8 (3, h, w): smooth ramps plus noise, so every op has something to change."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    ramps = torch.stack([xx * 5 % 256, yy * 7 + 20, (xx + yy) * 3 % 200 + 30]).float()
    noise = torch.randint(-25, 26, (3, h, w), generator=g).float()
    return (ramps + noise).clamp(0, 255).to(torch.uint8)


def _pil(image: torch.Tensor) -> Image.Image:
    return Image.fromarray(image.permute(1, 2, 0).numpy())


def _from_pil(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(image)).permute(2, 0, 1)


images = st.builds(
    _image,
    st.integers(3, 24),
    st.integers(3, 24),
    st.integers(0, 10_000),
)


# --------------------------------------------------------------------------- parsing
@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("rand-m9-mstd0.5-inc1", dict(num_layers=2, magnitude=9, magnitude_std=0.5, increasing=True)),
        ("rand-m9-n3-mstd0.5", dict(num_layers=3, magnitude=9, magnitude_std=0.5, increasing=False)),
        ("rand", dict(num_layers=2, magnitude=10, magnitude_std=0.0, magnitude_max=10.0, prob=0.5)),
        ("rand-inc1-n1-m7-p0.7-mmax12", dict(num_layers=1, magnitude=7, prob=0.7, magnitude_max=12)),
        ("rand-m5-mstd101", dict(magnitude=5, magnitude_std=math.inf)),
        ("rand-m9-inc0", dict(increasing=False)),
    ],
)
def test_parse_good_specs(spec: str, expected: dict) -> None:
    policy = ra.parse_rand_augment(spec)
    for name, value in expected.items():
        assert getattr(policy, name) == value, name
    ops = ra.RAND_INCREASING_TRANSFORMS if policy.increasing else ra.RAND_TRANSFORMS
    assert policy.ops == ops and len(ops) == 15 and set(ops) <= set(ra.OPS)


@pytest.mark.parametrize(
    ("spec", "bad_part"),
    [
        ("", "''"),
        ("augmix-m3", "'augmix'"),
        ("randm9", "'randm9'"),
        ("rand-m", "'m'"),
        ("rand-x9", "'x9'"),
        ("rand-m9.5", "'m9.5'"),
        ("rand-m9--n2", "''"),
        ("rand-mstd-1", "'mstd'"),
        ("rand-m9-m8", "'m'"),
        ("rand-p1.5", "'p'"),
        ("rand-w0", "'w0'"),
    ],
)
def test_parse_bad_specs_name_the_part(spec: str, bad_part: str) -> None:
    with pytest.raises(ValueError, match="RandAugment spec") as info:
        ra.parse_rand_augment(spec)
    assert bad_part in str(info.value)


# --------------------------------------------------------------------------- single ops
@settings(max_examples=40, deadline=None)
@given(image=images, name=st.sampled_from(sorted(ra.OPS)), level=st.floats(0, 10), seed=st.integers(0, 99))
def test_every_op_keeps_dtype_and_shape_and_input(
    image: torch.Tensor, name: str, level: float, seed: int
) -> None:
    before = image.clone()
    out = ra.apply_op(image, name, level, torch.Generator().manual_seed(seed))
    assert out.dtype == torch.uint8 and out.shape == image.shape
    assert torch.equal(image, before)


@pytest.mark.parametrize(
    ("name", "level"),
    [
        ("Rotate", 0), ("ShearX", 0), ("ShearY", 0), ("TranslateXRel", 0), ("TranslateYRel", 0),
        ("BrightnessIncreasing", 0), ("ColorIncreasing", 0), ("ContrastIncreasing", 0),
        ("SharpnessIncreasing", 0), ("SolarizeIncreasing", 0), ("SolarizeAdd", 0),
        ("Solarize", 10),
    ],
)  # fmt: skip
def test_no_change_levels_return_the_input_exactly(name: str, level: float) -> None:
    image = _image()
    for seed in range(3):  # both signs of the signed ops
        assert torch.equal(ra.apply_op(image, name, level, torch.Generator().manual_seed(seed)), image)


@settings(max_examples=20, deadline=None)
@given(image=images)
def test_invert_twice_is_identity(image: torch.Tensor) -> None:
    assert torch.equal(ra.invert(ra.invert(image)), image)
    assert torch.equal(ra.apply_op(ra.apply_op(image, "Invert", 5), "Invert", 5), image)


def test_posterize_and_solarize_values() -> None:
    values = torch.tensor([0, 37, 127, 128, 200, 255], dtype=torch.uint8)
    image = values.view(1, 1, 6).expand(3, 1, 6).contiguous()

    def row(out: torch.Tensor) -> list[int]:
        return out[0, 0].tolist()

    assert row(ra.posterize(image, 1)) == [0, 0, 0, 128, 128, 128]
    assert row(ra.posterize(image, 3)) == [0, 32, 96, 128, 192, 224]
    assert row(ra.posterize(image, 0)) == [0] * 6 and row(ra.posterize(image, 8)) == row(image)
    assert row(ra.solarize(image, 128)) == [0, 37, 127, 127, 55, 0]
    assert row(ra.solarize(image, 0)) == [255, 218, 128, 127, 55, 0]
    assert row(ra.solarize_add(image, 30)) == [30, 67, 157, 128, 200, 255]
    assert row(ra.solarize_add(image, 250)) == [250, 255, 255, 128, 200, 255]
    # Level -> argument as in timm, at m = 9: posterize keeps 4 - int(3.6) = 1 bit, solarize
    # increasing thresholds at 256 - int(230.4) = 26, solarize-add adds int(99.0) = 99.
    assert torch.equal(ra.apply_op(image, "PosterizeIncreasing", 9), ra.posterize(image, 1))
    assert torch.equal(ra.apply_op(image, "Posterize", 9), ra.posterize(image, 3))
    assert row(ra.apply_op(image, "SolarizeIncreasing", 9)) == [0, 218, 128, 127, 55, 0]
    assert row(ra.apply_op(image, "SolarizeAdd", 9)) == [99, 136, 226, 128, 200, 255]
    assert torch.equal(ra.apply_op(image, "Solarize", 5), ra.solarize(image, 128))


@pytest.mark.parametrize("seed", [0, 1])
def test_pixel_ops_equal_pil(seed: int) -> None:
    image = _image(31, 43, seed)
    pil = _pil(image)
    assert torch.equal(ra.auto_contrast(image), _from_pil(ImageOps.autocontrast(pil)))
    assert torch.equal(ra.equalize(image), _from_pil(ImageOps.equalize(pil)))
    assert torch.equal(ra.invert(image), _from_pil(ImageOps.invert(pil)))
    for factor in (0.1, 0.46, 1.0, 1.37, 1.9):
        for ours, theirs in [
            (ra.color, ImageEnhance.Color),
            (ra.contrast, ImageEnhance.Contrast),
            (ra.brightness, ImageEnhance.Brightness),
            (ra.sharpness, ImageEnhance.Sharpness),
        ]:
            expected = _from_pil(theirs(pil).enhance(factor))
            assert torch.equal(ours(image, factor), expected), (ours.__name__, factor)


def test_geometry_follows_pil_conventions() -> None:
    square = _image(17, 17)
    nearest = _from_pil(_pil(square).rotate(90, resample=Image.NEAREST))
    assert torch.equal(ra.rotate(square, 90), nearest)  # counter-clockwise, about the centre
    image = _image(12, 20)
    moved = ra.translate_x_rel(image, 5 / 20)  # whole pixels: no interpolation blur
    assert torch.equal(moved[:, :, :15], image[:, :, 5:]) and bool((moved[:, :, 15:] == 128).all())
    moved = ra.translate_y_rel(image, -3 / 12)
    assert torch.equal(moved[:, 3:], image[:, :9]) and bool((moved[:, :3] == 128).all())
    sheared = ra.shear_x(image, 0.25)  # row y samples x + 0.25 (y + 0.5): row 1.5 -> 0.375 px
    assert torch.equal(sheared[:, 0, :-1], ra.translate_x_rel(image, 0.125 / 20)[:, 0, :-1])


# --------------------------------------------------------------------------- the policy
def test_rand_augment_is_seeded_and_keeps_the_input() -> None:
    image = _image(40, 48)
    before = image.clone()
    policy = ra.parse_rand_augment("rand-m9-mstd0.5-inc1")

    def run(seed: int) -> torch.Tensor:
        return ra.rand_augment(image, policy, torch.Generator().manual_seed(seed))

    first = run(0)
    assert first.dtype == torch.uint8 and first.shape == image.shape
    assert torch.equal(first, run(0))
    assert any(not torch.equal(first, run(seed)) for seed in range(1, 6))
    assert torch.equal(image, before)
    with pytest.raises(ValueError, match="uint8"):
        ra.rand_augment(image.float(), policy)


def test_rand_augment_probability_and_layers() -> None:
    image = _image()
    off = ra.parse_rand_augment("rand-m9-p0")
    assert torch.equal(ra.rand_augment(image, off, torch.Generator().manual_seed(0)), image)
    none = ra.parse_rand_augment("rand-n0")
    assert torch.equal(ra.rand_augment(image, none), image)
    always = ra.parse_rand_augment("rand-m10-n3-p1")
    changed = sum(
        not torch.equal(ra.rand_augment(image, always, torch.Generator().manual_seed(s)), image)
        for s in range(10)
    )
    assert changed >= 8


# --------------------------------------------------------------------------- random erasing
def test_erasing_off_returns_an_unchanged_copy() -> None:
    x = torch.randn(3, 20, 24)
    out = ra.random_erasing(x, 0.0, torch.Generator().manual_seed(0))
    assert torch.equal(out, x) and out is not x
    with pytest.raises(ValueError, match="probability"):
        ra.random_erasing(x, 1.5)
    with pytest.raises(ValueError, match="mode"):
        ra.random_erasing(x, 0.5, mode="zeros")


@pytest.mark.parametrize("seed", range(12))
def test_erasing_changes_one_rectangle_only(seed: int) -> None:
    h, w = 40, 56
    x = torch.randn(3, h, w, generator=torch.Generator().manual_seed(100 + seed))
    before = x.clone()
    out = ra.random_erasing(x, 1.0, torch.Generator().manual_seed(seed))
    assert torch.equal(x, before) and out.dtype == x.dtype and out.shape == x.shape
    changed = (out != x).any(0)
    # All 10 tries could miss (then nothing changes), but none does for these fixed seeds.
    assert changed.any()
    rows = changed.any(1).nonzero().flatten()
    cols = changed.any(0).nonzero().flatten()
    top, bottom, left, right = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
    box = torch.zeros_like(changed)
    box[top:bottom, left:right] = True
    assert torch.equal(changed, box)  # a filled rectangle, nothing outside it
    eh, ew = bottom - top, right - left
    assert eh < h and ew < w
    # area within [0.02, 1/3] of the image, up to rounding each side to whole pixels
    slack = (eh + ew + 1) / 2
    assert 0.02 * h * w - slack <= eh * ew <= h * w / 3 + slack
    assert 0.3 * 0.8 <= eh / ew <= (1 / 0.3) * 1.25


def test_erasing_fills_with_unit_normal_noise_and_other_modes() -> None:
    x = torch.zeros(3, 64, 64)
    g = torch.Generator().manual_seed(3)
    noise = torch.cat([ra.random_erasing(x, 1.0, g)[x.new_ones(3, 64, 64).bool()] for _ in range(20)])
    noise = noise[noise != 0]
    assert noise.numel() > 5000 and abs(float(noise.mean())) < 0.1 and 0.9 < float(noise.std()) < 1.1
    const = ra.random_erasing(x + 1, 1.0, torch.Generator().manual_seed(1), mode="const")
    assert set(const.unique().tolist()) <= {0.0, 1.0}
    rand = ra.random_erasing(x, 1.0, torch.Generator().manual_seed(1), mode="rand")
    for c in range(3):
        assert rand[c].unique().numel() <= 2  # one colour per channel


# --------------------------------------------------------------------------- wiring
def _sample(h: int = 50, w: int = 64) -> dict:
    return {"image": _image(h, w), "label": 3}


def test_train_transform_applies_and_validates_the_options() -> None:
    plain = train_transform("classification", 32)
    both = train_transform(
        "classification", 32, rand_augment="rand-m9-mstd0.5-inc1", random_erasing=1.0
    )
    a = plain(_sample(), torch.Generator().manual_seed(5))
    b = both(_sample(), torch.Generator().manual_seed(5))
    assert b["image"].dtype == torch.float32 and b["image"].shape == (3, 32, 32)
    assert b["label"] == 3 and not torch.equal(a["image"], b["image"])
    again = both(_sample(), torch.Generator().manual_seed(5))
    assert torch.equal(b["image"], again["image"])
    with pytest.raises(ValueError, match="'q3'"):
        train_transform("classification", 32, rand_augment="rand-q3")
    with pytest.raises(ValueError, match="random_erasing"):
        train_transform("classification", 32, random_erasing=2.0)
    with pytest.raises(ValueError, match="unknown dense augmentation"):
        train_transform("semantic", 32, rand_augment="rand-m9")


def test_classification_loader_with_both_options(tmp_path: Path) -> None:
    make_shapes(tmp_path / "raw", num_images=8, image_size=32, seed=1)
    options = {"rand_augment": "rand-m9-mstd0.5-inc1", "random_erasing": 0.5}
    kwargs = {"batch_size": 4, "image_size": 24, "train": True, "seed": 7}
    plain = next(iter(build_loader(tmp_path / "raw", "classification", LoaderSpec(**kwargs))))
    loader = build_loader(tmp_path / "raw", "classification", LoaderSpec(augment=options, **kwargs))
    batch = next(iter(loader))
    images = batch["images"]
    assert images.dtype == torch.float32 and images.shape == (4, 3, 24, 24)
    assert bool(torch.isfinite(images).all()) and not torch.equal(images, plain["images"])
    assert torch.equal(images, next(iter(loader))["images"])  # same epoch, same augmentation


def test_imagenet_recipe_options_reach_the_loader() -> None:
    cfg = resolve_config("imagenet-1k", data="d", out="o")
    options, missing = augment_options(cfg, "image")
    # the recipe sets the flip: ImageNet photos need no handedness check
    assert options == {"rand_augment": "rand-m9-mstd0.5-inc1", "random_erasing": 0.25, "flip": True}
    assert missing == []
    transform = train_transform("classification", cfg.data.image_size, **options)
    out = transform(_sample(), torch.Generator().manual_seed(0))
    assert out["image"].shape == (3, 224, 224) and out["image"].dtype == torch.float32

    off = resolve_config("imagenet-1k", data="d", out="o", rand_augment="none",
                         random_erasing=0.0)  # fmt: skip
    assert augment_options(off, "image") == ({"random_erasing": 0.0, "flip": True}, [])
    # the dense transforms take neither: they are left out, with a note
    assert augment_options(cfg, "dense") == ({"flip": True}, ["rand_augment", "random_erasing"])
    more = resolve_config("imagenet-1k", data="d", out="o", sets=["data.augment.scale=[0.5, 1]"])
    assert augment_options(more, "image")[0]["scale"] == [0.5, 1.0]


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--rand-augment", "rand-m9-zz1"], "--rand-augment: RandAugment spec"),
        (["--random-erasing", "1.5"], "data.augment.random_erasing must be in [0, 1]"),
    ],
)
def test_cli_rejects_bad_values_in_one_line(
    flags: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    args = ["train", "--task", "classification", "--data", str(tmp_path), "--out",
            str(tmp_path / "run"), *flags]  # fmt: skip
    assert run_cf(args) != 0
    err = capsys.readouterr().err
    assert message in err and err.startswith("cf: error:") and err.count("\n") == 1
    assert not (tmp_path / "run").exists()


def test_cli_help_lists_the_flags(capsys: pytest.CaptureFixture) -> None:
    assert run_cf(["train", "--help-all"]) == 0  # every setting; --help shows the everyday ones
    out = capsys.readouterr().out
    assert "--rand-augment" in out and "--random-erasing" in out
